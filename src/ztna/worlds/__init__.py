"""ztna.worlds: whole-program worlds for the tests and the ``bench/`` scripts (root only).

Each world starts real ``ztna`` processes (and real backends) in network namespaces and
offers the few probes the tests and benchmarks share, so ``bench/`` needs nothing from
``tests/``:

* ``lab_tun``: Intermediate + Connector + TUN-mode Agent on a ``ztna.lab`` topology, with an
  HTTP backend and ``curl`` through the TUN;
* ``lab_udp``: the same with a userspace Agent forwarding UDP to an echo backend;
* ``bridge``: one namespace with everything on loopback and ``tun_bridge`` (a minimal TUN
  Agent) in place of the Agent, so the kernel's TCP drives the Connector;
* ``agent_client``: a minimal in-process Agent over QUIC (``AgentClient``) and backends.

Processes are started and stopped with ``ztna.procs``.
"""
