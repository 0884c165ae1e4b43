"""Several Intermediates acting as one, sharing state through a store (Redis).

`ztna intermediate --cluster redis://HOST:PORT/DB --advertise HOST:PORT` joins a cluster;
without `--cluster` nothing here is imported and an Intermediate keeps its state in memory and
SQLite as before.

What the members share (docs/intermediate.md, "Cluster"):

* the address-token key and the stateless-reset key, each created once by whichever member
  comes first (`SET NX`) and read by all the others, so a client's NEW_TOKEN from one member
  spares it the Retry on another;
* the session tickets themselves. Our TLS 1.3 tickets are stateful (a random label on the
  wire, the resumption state at the server), so there is no ticket-encryption key to share:
  the resumption state lives in the store, and taking it is an atomic `GETDEL`. That one
  operation is both what lets a client resume in 0-RTT on another member and the strike
  register: a ticket spent on one member is gone for every other.

Modules: `url` (validating the store address, pure), `health` (the up/down state of the store,
pure, time passed in), `store` (the store Protocol and its Redis implementation), `tickets`
(the ticket backend the native TLS code calls), `member` (the driver: joining, probing,
recovering, metrics and /healthz), `presence` (leases and the pure ClusterView), `mesh` (traffic,
streams and punch signaling between members, and the native mesh routes).
"""
