"""The ztna Agent: TUN split tunnel or userspace forwards over one Intermediate session.

`ztna.agent.agent.Agent(options)` with `start()` / `stop()` / `snapshot()` is the Python API;
`ztna agent` and `ztna status` are the CLI (docs/agent.md).
"""
