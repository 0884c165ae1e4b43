"""The native core's boundary: no ztna program imports aioquic, and a Rust panic inside the
native endpoint is caught, counted and survived (the endpoint keeps serving)."""

from __future__ import annotations

import ast
import asyncio
import subprocess
import sys
from pathlib import Path

from ztna.certs import init_pki
from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.wire import Register, RegistrationAck, Role, encode_control

SRC = Path(__file__).resolve().parents[2] / "src" / "ztna"


def test_no_module_of_the_package_imports_aioquic() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(SRC)}: {n}" for n in names if n.split(".")[0] == "aioquic"]
    assert offenders == []


def test_the_programs_run_without_aioquic_loaded() -> None:
    """Import every program's modules in a fresh interpreter; aioquic must not be loaded."""
    code = (
        "import sys, ztna.cli, ztna.intermediate.server, ztna.connector.service, "
        "ztna.agent.agent, ztna.client.testclient, ztna.demo.runner\n"
        "print('aioquic' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


class _Registrar(ConnectionHandler):
    def __init__(self) -> None:
        self.acked = asyncio.Event()

    def on_message(self, conn, msg):  # type: ignore[no-untyped-def]
        if isinstance(msg, RegistrationAck):
            self.acked.set()


async def _register_once(pki: Path, port: int, *, keylog: str | None = None) -> None:
    """One client connection that registers for 'echo' and gets its ACK, then closes."""
    ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
    cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "agent"),
                             server_name="localhost", keylog_path=keylog)
    handler = _Registrar()
    conn = ep.connect(("127.0.0.1", port), cfg, handler)
    conn.send_control(encode_control(Register(role=Role.AGENT, service_id="echo")))
    await asyncio.wait_for(handler.acked.wait(), 5)
    conn.close()
    ep.shutdown_socket()


def test_a_native_panic_is_counted_and_the_endpoint_keeps_serving(tmp_path: Path) -> None:
    init_pki(tmp_path, ["echo"], ["localhost", "127.0.0.1"], 1)

    async def main() -> None:
        srv = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(tmp_path, "intermediate"),
                                               listen=[("127.0.0.1", 0)], metrics=None))
        await srv.start()
        server_ep = srv.endpoints[0]
        try:
            # A panic inside the native endpoint (a deliberate one, through the test hook)
            # comes back as a counted failure, not an exception that ends the process.
            assert server_ep.native._panic_for_test() is True
            assert server_ep.stats.panics == 1
            # ... and the same endpoint still accepts and serves a new client.
            await _register_once(tmp_path, srv.ports[0])
        finally:
            await srv.stop()

    asyncio.run(main())


def test_keylog_files_get_sslkeylogfile_lines_from_both_sides(tmp_path: Path) -> None:
    import re

    init_pki(tmp_path, ["echo"], ["localhost", "127.0.0.1"], 1)
    server_log, client_log = tmp_path / "server.keys", tmp_path / "client.keys"

    async def main() -> None:
        srv = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(tmp_path, "intermediate"),
                                               listen=[("127.0.0.1", 0)], metrics=None,
                                               keylog=str(server_log)))
        await srv.start()
        try:
            await _register_once(tmp_path, srv.ports[0], keylog=str(client_log))
        finally:
            await srv.stop()

    asyncio.run(main())
    line = re.compile(r"^[A-Z0-9_]+ [0-9a-f]{64} [0-9a-f]{64,}$")
    for path in (server_log, client_log):
        lines = path.read_text().splitlines()
        labels = {ln.split()[0] for ln in lines}
        assert all(line.match(ln) for ln in lines), lines
        assert {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"} <= labels, labels
    # Both sides logged the same handshake (same client random).
    randoms = {p: {ln.split()[1] for ln in p.read_text().splitlines()} for p in (server_log, client_log)}
    assert randoms[server_log] & randoms[client_log]
