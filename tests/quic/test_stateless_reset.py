"""A restarted Intermediate resets its predecessor's connections (keyed reset tokens), so
clients learn at their next packet instead of after the 30 s idle timeout."""

from __future__ import annotations

import asyncio

from ztna.certs import init_pki
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler
from ztna.quic.endpoint import QuicEndpoint, bind_udp


def test_restarted_server_resets_old_connections(tmp_path):
    init_pki(tmp_path, ["echo"], ["localhost", "127.0.0.1"], 1)

    def options(port: int) -> IntermediateOptions:
        return IntermediateOptions(tls=TlsFiles.from_dir(tmp_path, "intermediate"),
                                   listen=[("127.0.0.1", port)], metrics=None)

    async def main() -> None:
        old = Intermediate(options(0))
        await old.start()
        port = old.ports[0]
        closed = asyncio.get_running_loop().create_future()

        class Handler(ConnectionHandler):
            def on_closed(self, conn, reason):
                if not closed.done():
                    closed.set_result(reason)

        ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
        cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(tmp_path, "agent"), server_name="localhost")
        conn = ep.connect(("127.0.0.1", port), cfg, Handler())
        await asyncio.wait_for(conn.wait_handshake(), 5)
        # The old process dies without a word (like SIGKILL): its socket just goes away.
        for endpoint in old.endpoints:
            endpoint.shutdown_socket()
        new = Intermediate(options(port))
        await new.start()
        conn.ping()
        reason = await asyncio.wait_for(closed, 2)  # far below the 30 s idle timeout
        assert "stateless reset" in reason
        assert ep.stats.stateless_resets_received == 1
        assert new.endpoints[0].stats.stateless_resets_sent >= 1
        await new.stop()
        ep.shutdown_socket()

    asyncio.run(main())
