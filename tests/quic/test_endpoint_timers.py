"""The endpoint's one connection timer: kept while it fires no later than the native
deadline (a later deadline does not re-arm it), replaced when the deadline moves earlier,
and an early firing is harmless (the connection keeps carrying datagrams)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from ztna.certs import init_pki
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, ServerOptions, bind_udp


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


class Echo(ConnectionHandler):
    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        conn.send_datagram(data)


class Collect(ConnectionHandler):
    def __init__(self) -> None:
        self.got: asyncio.Queue[bytes] = asyncio.Queue()

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self.got.put_nowait(data)


def test_timer_kept_for_later_deadlines_and_early_firing_is_harmless(pki: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        scfg = make_configuration(is_client=False, tls=TlsFiles.from_dir(pki, "intermediate"))
        server = QuicEndpoint(bind_udp("127.0.0.1", 0), server=ServerOptions(
            configuration=scfg, handler_factory=Echo, retry=False))
        client_ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
        client = Collect()
        ccfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"),
                                  server_name="localhost")
        conn = client_ep.connect(("127.0.0.1", server.local_address[1]), ccfg, client)
        await asyncio.wait_for(conn.wait_handshake(), 5)

        async def round_trip() -> None:
            payload = os.urandom(200)
            assert conn.send_datagram(payload)
            assert await asyncio.wait_for(client.got.get(), 5) == payload

        await round_trip()
        client_ep.flush()
        assert not client_ep.native.busy()          # nothing left queued after a flush
        deadline = client_ep.native.next_timeout()
        assert deadline is not None                 # a live connection has an idle timer at least

        # An armed timer earlier than the deadline stays (no cancel, no new heap entry).
        fired: list[float] = []
        early_at = max(loop.time(), deadline - 0.5)

        def early() -> None:
            fired.append(loop.time())
            client_ep._on_timer()

        if client_ep._timer is not None:
            client_ep._timer.cancel()
        client_ep._timer = loop.call_at(early_at, early)
        client_ep._timer_at = early_at
        kept = client_ep._timer
        client_ep._arm_timer()
        assert client_ep._timer is kept

        # A timer later than the deadline is replaced by one at the deadline.
        kept.cancel()
        client_ep._timer = loop.call_at(deadline + 60, early)
        client_ep._timer_at = deadline + 60
        late = client_ep._timer
        client_ep._arm_timer()
        assert client_ep._timer is not late and late.cancelled()
        assert client_ep._timer_at == client_ep.native.next_timeout()

        # Fire early on purpose: the native side runs only what is due, and a timer is armed
        # again for what is left.
        client_ep._timer.cancel()
        client_ep._timer = loop.call_at(loop.time(), early)
        client_ep._timer_at = loop.time()
        await asyncio.sleep(0.05)
        assert fired
        assert client_ep._timer is not None and client_ep._timer_at is not None
        assert not conn.closed
        await round_trip()

        conn.close()
        client_ep.flush()
        client_ep.shutdown_socket()
        server.shutdown_socket()

    asyncio.run(main())
