"""Settings every backend TCP connection of the Connector gets, whichever carriage (TCP in
DATAGRAMs or QUIC streams) brought the Agent's connection.

The write-buffer marks are the back-pressure point toward the backend: above WRITE_HIGH the
Connector stops taking bytes from the tunnel (the TCP window or the QUIC stream credit then
closes), below WRITE_LOW it resumes. TCP_NODELAY because the tunnel already batches.
"""

from __future__ import annotations

import socket
from typing import Any

WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


def tune_backend_transport(transport: Any) -> None:
    transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
