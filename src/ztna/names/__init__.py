"""Apps by DNS name: domain patterns and the Agent's synthetic address pools (pure code).

* `patterns`  which names a service covers (`*.corp.test`, `git.corp.test`), name checks
* `pool`      synthetic IPv4/IPv6 addresses handed out for names, expiring with their TTL

Both are sans-IO: time is passed in (`now`, monotonic seconds), nothing here touches a socket.
The drivers that use them are `ztna.agent.dns` (the Agent's DNS responder) and
`ztna.connector.resolve` (the Connector's resolver).
"""
