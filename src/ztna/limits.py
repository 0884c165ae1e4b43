"""Limits and defaults shared by all three programs — the one definition.

Sizes are in bytes, times in seconds. The live DATAGRAM maximum is never a constant: it is
computed from the connection (ztna.quic) and these values only bound it.
"""

from typing import Final

ALPN: Final = "ztna-v1"

# UDP payload size we configure for QUIC packets (the native core's fixed MTU).
# 1350 as in the original; with 20-byte CIDs this leaves 1300 bytes of DATAGRAM payload.
DEFAULT_QUIC_UDP_PAYLOAD: Final = 1350
MIN_QUIC_UDP_PAYLOAD: Final = 1200   # RFC 9000 §14: every QUIC path carries 1200
MAX_QUIC_UDP_PAYLOAD: Final = 1452   # 1500-byte Ethernet MTU minus IPv6 (40) and UDP (8)

# The short-header overhead the native core (quinn-proto) budgets for a DATAGRAM frame:
#   1 (flags) + DCID + 4 (the longest packet number, so the size never flickers) + 16 (AEAD tag)
#   + 9 (frame type + the longest length varint)
SHORT_HEADER_FIXED_OVERHEAD: Final = 1 + 4 + 16
DATAGRAM_FRAME_OVERHEAD: Final = 9

CONNECTION_ID_LENGTH: Final = 20
IDLE_TIMEOUT: Final = 30.0
KEEPALIVE_INTERVAL: Final = 10.0
NAT_KEEPALIVE_INTERVAL: Final = 15.0        # <= 25 s
CID_ROTATION_INTERVAL: Final = 300.0

# Ports (docs/ports.md)
INTERMEDIATE_PORT: Final = 4433
CONNECTOR_P2P_PORT: Final = 4434
CONNECTOR_RELAY_PORT: Final = 0              # ephemeral by default; --relay-port to pin it
INTERMEDIATE_METRICS_PORT: Final = 9090
CONNECTOR_METRICS_PORT: Final = 9091

# Queues: datagrams waiting for congestion window, per connection (drop-oldest beyond).
DATAGRAM_QUEUE_LIMIT: Final = 512
# Socket loop: at most this many datagrams read before one flush.
RECV_BATCH: Final = 256

# Control stream
CONTROL_FRAME_MAX: Final = 16384

# Registry limits (Intermediate)
MAX_CONNECTIONS: Final = 10000
MAX_REGISTRATIONS_PER_CONNECTION: Final = 64
HANDSHAKES_PER_SOURCE_PER_SECOND: Final = 20

# Service ids
SERVICE_ID_MAX: Final = 63


def max_datagram_payload(udp_payload: int, dcid_len: int) -> int:
    """Largest DATAGRAM payload the native core puts in one short-header packet."""
    return udp_payload - (SHORT_HEADER_FIXED_OVERHEAD + dcid_len) - DATAGRAM_FRAME_OVERHEAD

# Resumable TCP streams (docs/protocol.md §5.1): how long the Connector keeps a stream whose
# direct connection died, waiting for the Agent's StreamResume on the relay, and how many
# such streams one Agent may hold (beyond it, streams are opened without a token).
STREAM_RESUME_GRACE = 15.0
STREAM_RESUME_PER_AGENT = 256

# Cluster store (`ztna intermediate --cluster`): the session-ticket calls block the handshake,
# so they wait this long at most before 0-RTT is refused; other store calls wait longer.
CLUSTER_TICKET_TIMEOUT: Final = 0.1
CLUSTER_STORE_TIMEOUT: Final = 2.0
CLUSTER_PROBE_INTERVAL: Final = 1.0          # how often a member checks the store (recovery)
CLUSTER_JOIN_TIMEOUT: Final = 10.0           # a starting member waits this long for the store
CLUSTER_LEASE: Final = 6.0                   # a member's presence expires this long after its last refresh
CLUSTER_LEASE_REFRESH: Final = 2.0
MESH_REMOTE_AGENTS: Final = 100_000          # remote Agents one mesh connection may bring

# TCP carried on QUIC streams is spliced natively (the native core moves every byte between
# the kernel socket and the stream). ZTNA_PYTHON_SPLICE=1 moves the bytes through Python
# instead, the way it was done before: for measuring the two side by side (bench/).
NATIVE_SPLICE: Final = __import__("os").environ.get("ZTNA_PYTHON_SPLICE", "") != "1"
# Tunnel DATAGRAMs across the cluster mesh take native routes once Python has placed the
# first packet of an Agent's service, and mesh links leave from the listening socket so that
# streams onto them splice natively too (ztna.cluster.mesh). ZTNA_PYTHON_MESH=1 keeps the mesh
# as it was before (every DATAGRAM through Python, links on a socket of their own), for
# measuring the two side by side (bench/mesh_throughput.py).
NATIVE_MESH: Final = __import__("os").environ.get("ZTNA_PYTHON_MESH", "") != "1"

# Socket buffers of every QUIC UDP socket, each way: a bandwidth-delay product's worth, so a
# burst that arrives while the process is busy waits in the kernel instead of being dropped
# (8 MiB = 1.6 Gbit/s for 40 ms, the same product the 8 MiB stream windows allow). As root
# the kernel's net.core.rmem_max/wmem_max cap is bypassed (SO_RCVBUFFORCE/SO_SNDBUFFORCE).
UDP_SOCKET_BUFFER: Final = 8 * 1024 * 1024
