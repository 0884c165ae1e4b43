"""Userspace network stack for the App Connector: IP/UDP/ICMP/TCP codecs and a TCP endpoint.

Pure code: no I/O, no clocks, no randomness. `packets` parses and builds whole IP packets,
`checksum` holds the Internet checksum, `tcp` is the per-flow TCP state machine.
"""
