"""End to end: a real `ztna intermediate` process on loopback, driven by `ztna client`
subprocesses (--json) and by in-test peers on the QUIC adapter (an echoing Connector)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from intermediate_helpers import IntermediateProc, Peer, cli_client

from ztna.certs import init_pki, issue
from ztna.quic.config import TlsFiles
from ztna.quic.maintenance import ConnectionUpkeep, rotate_connection_id
from ztna.wire import GoAway, RegistrationAck, RegistrationNack, Role, ServiceStatus

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo", "web"])
    issue(d, "agent", "unscoped-agent", scoped=False)
    issue(d, "connector", "unscoped-connector", scoped=False)
    issue(d, "connector", "connector-2", ["echo"])
    issue(d, "agent", "agent-2", ["echo"])
    return d


@pytest.fixture(scope="module")
def server(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IntermediateProc]:
    # Generous per-source handshake rate: the flood test uses its own server.
    proc = IntermediateProc(["--pki", str(pki), "--handshakes-per-second", "1000"],
                            tmp_path_factory.mktemp("log") / "intermediate.log").start()
    yield proc
    assert proc.stop() == 0, proc.log()


def tls(pki: Path, name: str) -> TlsFiles:
    return TlsFiles.from_dir(pki, name)


def client_args(server: IntermediateProc, pki: Path, host: str = "127.0.0.1", ident: str = "agent") -> list[str]:
    target = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    return ["--server", target, "--ca-cert", str(pki / "ca.pem"),
            "--client-cert", str(pki / f"{ident}.pem"), "--client-key", str(pki / f"{ident}.key")]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- QAD + auth

def test_qad_ipv4_and_ipv6(server: IntermediateProc, pki: Path) -> None:
    async def main() -> None:
        rc4, r4 = await cli_client(*client_args(server, pki, "127.0.0.1"))
        rc6, r6 = await cli_client(*client_args(server, pki, "::1"))
        assert rc4 == 0 and rc6 == 0, (r4, r6)
        # A v4 client on the dual-stack socket is reported as plain IPv4, not ::ffff:.
        assert r4["qad"]["ip"] == "127.0.0.1"
        assert r6["qad"]["ip"] == "::1"
        assert 0 < r4["qad"]["port"] < 65536 and 0 < r6["qad"]["port"] < 65536
        assert r4["max_datagram_payload"] == 1300  # 1350 - 1 - 20 - 4 - 16 - 9
    run(main())


def test_registration_ack_and_nack(server: IntermediateProc, pki: Path) -> None:
    rc, r = run(cli_client(*client_args(server, pki), "--service", "echo", "--service", "secret"))
    assert rc == 3
    assert r["registrations"] == {"echo": "ack", "secret": "nack:NOT_AUTHORIZED"}
    # The agent certificate may not register as a connector either.
    rc, r = run(cli_client(*client_args(server, pki), "--service", "echo", "--as-connector"))
    assert rc == 3 and r["registrations"] == {"echo": "nack:NOT_AUTHORIZED"}


def test_no_client_cert_and_wrong_alpn_are_refused(server: IntermediateProc, pki: Path) -> None:
    rc, r = run(cli_client("--server", f"127.0.0.1:{server.port}", "--ca-cert", str(pki / "ca.pem"),
                           "--no-client-cert", "--service", "echo"))
    assert rc == 1 and r["registrations"].get("echo") != "ack" and r["closed"], r
    rc, r = run(cli_client(*client_args(server, pki), "--alpn", "h3", "--expect-fail"))
    assert rc == 0 and r["connected"] is False and r["expected_failure"] is True
    rc, r = run(cli_client(*client_args(server, pki), "--expect-fail"))
    assert rc == 1  # a working connection is not an expected failure


def test_certificate_from_another_ca_is_not_reported_connected(server: IntermediateProc, pki: Path,
                                                               tmp_path: Path) -> None:
    other = tmp_path / "other"
    init_pki(other, ["echo"])
    args = ["--server", f"127.0.0.1:{server.port}", "--ca-cert", str(pki / "ca.pem"),
            "--client-cert", str(other / "agent.pem"), "--client-key", str(other / "agent.key")]
    rc, r = run(cli_client(*args, "--service", "echo"))
    assert rc == 1, r
    assert r["connected"] is False and r["ok"] is False, r
    assert "invalid client certificate" in (r["close_reason"] or ""), r


def test_unscoped_cert_refused_by_default_allowed_with_flag(pki: Path, server: IntermediateProc,
                                                            tmp_path: Path) -> None:
    rc, r = run(cli_client(*client_args(server, pki, ident="unscoped-agent"), "--service", "echo"))
    assert rc == 1 and "no ztna service SAN" in (r["closed"] or ""), r
    insecure = IntermediateProc(["--pki", str(pki), "--insecure-allow-unscoped-certs"],
                                tmp_path / "insecure.log").start()
    try:
        assert "WARNING" in insecure.log() and "insecure-allow-unscoped-certs" in insecure.log()

        async def main() -> None:
            rc, r = await cli_client(*client_args(insecure, pki, ident="unscoped-agent"), "--service", "echo")
            assert rc == 0 and r["registrations"] == {"echo": "ack"}, r
            # An unscoped connector may not join a pool held by a scoped connector.
            scoped = await Peer().connect("127.0.0.1", insecure.port, tls(pki, "connector"))
            assert isinstance(await scoped.register(Role.CONNECTOR, "echo"), RegistrationAck)
            rogue = await Peer().connect("127.0.0.1", insecure.port, tls(pki, "unscoped-connector"))
            reply = await rogue.register(Role.CONNECTOR, "echo")
            assert isinstance(reply, RegistrationNack) and reply.status.name == "SERVICE_CONFLICT"
            await rogue.close()
            await scoped.close()
        run(main())
    finally:
        assert insecure.stop() == 0


# ---------------------------------------------------------------------------- sizes + echo

def test_max_passes_end_to_end_and_max_plus_one_is_refused(server: IntermediateProc, pki: Path) -> None:
    async def main() -> None:
        conn = await Peer(echo=True).connect("127.0.0.1", server.port, tls(pki, "connector"))
        assert isinstance(await conn.register(Role.CONNECTOR, "echo"), RegistrationAck)
        base = [*client_args(server, pki), "--service", "echo", "--verify-echo", "--timeout", "3"]
        for dst in ("10.1.2.3:9999", "[fd00:1::3]:9999"):
            for size in ("max", "max-1"):
                rc, r = await cli_client(*base, "--dst", dst, "--payload-size", size, "--payload-pattern", "random")
                assert rc == 0 and r["echo_ok"] is True and r["echoed"] == 1, r
                want = r["tunnel_max"] - (0 if size == "max" else 1)
                assert r["datagram_bytes"] == want
        # A client configured for bigger packets than the Intermediate learns the server's
        # DATAGRAM limit from the handshake, so its "max" still makes it through the relay.
        rc, r = await cli_client(*base, "--udp-payload", "1452", "--dst", "10.1.2.3:9999", "--payload-size", "max")
        assert rc == 0 and r["max_datagram_payload"] == 1300 and r["echo_ok"] is True, r
        rc, r = await cli_client(*base, "--udp-payload", "1200", "--dst", "10.1.2.3:9999", "--payload-size", "max")
        assert rc == 0 and r["max_datagram_payload"] == 1150 and r["echo_ok"] is True, r
        rc, r = await cli_client(*base, "--dst", "10.1.2.3:9999", "--payload-size", "max+1")
        assert rc == 5 and r["sent"] == 0 and "exceeds the tunnel maximum" in r["refused_locally"], r
        # Raw DATAGRAM above the live maximum: refused by the adapter, never sent.
        rc, r = await cli_client(*client_args(server, pki), "--send-hex", "2f" * (r["max_datagram_payload"] + 1))
        assert rc == 5 and r["sent"] == 0
        await conn.close()
    run(main())
    assert server.metrics().get('ztna_relay_dropped_total{reason="oversize"}', 0) == 0


def test_two_agents_never_see_each_others_traffic(server: IntermediateProc, pki: Path) -> None:
    async def main() -> None:
        conn = await Peer(echo=True).connect("127.0.0.1", server.port, tls(pki, "connector"))
        assert isinstance(await conn.register(Role.CONNECTOR, "echo"), RegistrationAck)
        common = ["--service", "echo", "--dst", "10.1.2.3:9999", "--verify-echo", "--repeat", "10",
                  "--burst", "5", "--delay", "5"]
        (rc_a, a), (rc_b, b) = await asyncio.gather(
            cli_client(*client_args(server, pki), *common, "--send-udp", "from agent A"),
            cli_client(*client_args(server, pki, ident="agent-2"), *common, "--send-udp", "from agent B"),
        )
        for rc, r in ((rc_a, a), (rc_b, b)):
            assert rc == 0 and r["sent"] == 50 and r["echoed"] == 50 and r["echo_ok"], r
            assert r["unrelated"] == 0, r  # not one packet of the other agent's
        assert conn.echoed == 100
        await conn.close()
    run(main())


# ---------------------------------------------------------------------------- registry semantics

def test_connector_pool_and_service_down(server: IntermediateProc, pki: Path) -> None:
    async def main() -> None:
        agent = await Peer().connect("::1", server.port, tls(pki, "agent"))
        c1 = await Peer(echo=True).connect("127.0.0.1", server.port, tls(pki, "connector"))
        c2 = await Peer(echo=True).connect("127.0.0.1", server.port, tls(pki, "connector-2"))
        assert isinstance(await c1.register(Role.CONNECTOR, "web"), RegistrationAck)
        assert isinstance(await agent.register(Role.AGENT, "web"), RegistrationAck)
        # A second connector identity joins; it never takes the service away from the first.
        reply = await c2.register(Role.CONNECTOR, "web")
        assert isinstance(reply, RegistrationNack)  # connector-2 is only authorised for echo
        assert isinstance(await c2.register(Role.CONNECTOR, "echo"), RegistrationAck)
        assert isinstance(await c1.register(Role.CONNECTOR, "echo"), RegistrationAck)
        assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
        down = lambda svc: (lambda m: isinstance(m, ServiceStatus) and m.service == svc and not m.up)  # noqa: E731
        await c2.close()
        await asyncio.sleep(0.3)
        assert not any(down("echo")(m) for m in agent.messages), agent.messages  # c1 still serves echo
        await c1.close()
        await agent.wait_message(down("echo"))
        await agent.wait_message(down("web"))
        await agent.close()
    run(main())


# ---------------------------------------------------------------------------- CID rotation

def test_cid_rotation_keeps_routing(server: IntermediateProc, pki: Path) -> None:
    async def main() -> None:
        conn = await Peer(echo=True).connect("127.0.0.1", server.port, tls(pki, "connector"))
        assert isinstance(await conn.register(Role.CONNECTOR, "echo"), RegistrationAck)
        agent = await Peer().connect("127.0.0.1", server.port, tls(pki, "agent"))
        assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
        assert agent.conn is not None
        from ztna.netstack.packets import build_udp_packet, ip_to_bytes
        from ztna.wire import encode_service_datagram

        async def echo_once(tag: bytes) -> None:
            pkt = build_udp_packet(ip_to_bytes("10.0.0.9"), ip_to_bytes("10.1.2.3"), 4000, 9999, tag)
            agent.datagrams.clear()
            agent.conn.send_datagram(encode_service_datagram("echo", pkt))
            for _ in range(200):
                if any(d.endswith(tag) for d in agent.datagrams):
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"no echo for {tag!r}")

        seen = {agent.conn.current_dcid()}
        for i in range(3):
            assert rotate_connection_id(agent.conn)
            seen.add(agent.conn.current_dcid())
            await echo_once(b"after-rotation-%d" % i)
        assert len(seen) == 4  # four distinct destination CIDs, all routed by the server
        upkeep = ConnectionUpkeep(agent.conn, keepalive=0.2, cid_rotation=0.5).start()
        await asyncio.sleep(1.3)
        upkeep.stop()
        assert upkeep.rotations >= 2 and upkeep.pings >= 4
        await echo_once(b"after-upkeep")
        await agent.close()
        await conn.close()
    run(main())


def test_the_agent_rotates_its_connection_id_and_its_tunnel_keeps_working(
        server: IntermediateProc, pki: Path, tmp_path: Path) -> None:
    """The real Agent session (not the test client) moves to fresh connection IDs on its
    own, and every echo after a move comes back byte for byte."""
    from ztna.agent.config import AgentOptions, ServiceSpec
    from ztna.agent.session import Session
    from ztna.netstack.packets import build_udp_packet, ip_to_bytes

    async def main() -> None:
        conn = await Peer(echo=True).connect("127.0.0.1", server.port, tls(pki, "connector"))
        assert isinstance(await conn.register(Role.CONNECTOR, "echo"), RegistrationAck)
        got: list[bytes] = []
        opts = AgentOptions(intermediate=("127.0.0.1", server.port), tls=tls(pki, "agent"),
                            server_name="localhost", state_dir=tmp_path, cid_rotation=0.4,
                            services=(ServiceSpec(id="echo", virtual_ips=("10.1.2.3",)),))
        session = Session(opts, on_packet=got.append)
        await session.start()
        svc = session.services[0]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not svc.ready and loop.time() < deadline:
            await asyncio.sleep(0.02)
        assert svc.ready and session.conn is not None
        seen = {session.conn.current_dcid()}
        for i in range(4):
            tag = b"agent-rotation-%d" % i
            pkt = build_udp_packet(ip_to_bytes("100.64.0.2"), ip_to_bytes("10.1.2.3"), 4000, 7, tag)
            got.clear()
            session.send(svc, svc.prefix + pkt)
            for _ in range(300):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got and got[0] == build_udp_packet(ip_to_bytes("10.1.2.3"), ip_to_bytes("100.64.0.2"),
                                                      7, 4000, tag)
            await asyncio.sleep(0.5)
            assert session.conn is not None
            seen.add(session.conn.current_dcid())
        assert len(seen) >= 3, seen          # the session rotated on its own, more than once
        assert session.counters.reconnects == 0
        await session.stop()
        await conn.close()
    run(main())


# ---------------------------------------------------------------------------- garbage + flood

def test_garbage_and_handshake_flood_leave_it_serving(pki: Path, tmp_path: Path) -> None:
    srv = IntermediateProc(["--pki", str(pki)], tmp_path / "flood.log").start()
    try:
        rng = random.Random(7)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target = ("127.0.0.1", srv.port)
        for i in range(300):
            kind = i % 6
            if kind == 0:      # not QUIC at all (first byte < 0x40)
                data = bytes([rng.randrange(0x40)]) + rng.randbytes(rng.randrange(0, 100))
            elif kind == 1:    # short header, unknown connection id
                data = bytes([0x40 | rng.randrange(0x40)]) + rng.randbytes(60)
            elif kind == 2:    # long header, truncated
                data = bytes([0xC0]) + rng.randbytes(rng.randrange(0, 6))
            elif kind == 3:    # Initial-looking, too short (< 1200)
                data = b"\xc0\x00\x00\x00\x01\x14" + rng.randbytes(20) + b"\x14" + rng.randbytes(20) + rng.randbytes(100)
            elif kind == 4:    # oversized random
                data = bytes([0x80 | rng.randrange(0x80)]) + rng.randbytes(rng.randrange(1500, 9000))
            else:              # QUIC-looking Initial of the right size, random content
                data = (b"\xc3\x00\x00\x00\x01\x14" + rng.randbytes(20) + b"\x14"
                        + rng.randbytes(20) + b"\x00" + rng.randbytes(1200))
            sock.sendto(data, target)
        sock.close()

        async def flood() -> None:
            from ztna.quic.config import make_configuration
            from ztna.quic.connection import ConnectionHandler
            from ztna.quic.endpoint import QuicEndpoint, bind_udp

            eps = [QuicEndpoint(bind_udp("0.0.0.0", 0)) for _ in range(20)]
            config = make_configuration(is_client=True, tls=tls(pki, "agent"), server_name="localhost")
            conns = [eps[i % 20].connect(target, config, ConnectionHandler()) for i in range(200)]
            await asyncio.sleep(1.5)
            for c in conns:
                c.close()
            for ep in eps:
                ep._flush()
            await asyncio.sleep(0.1)
            for ep in eps:
                ep.shutdown_socket()

            # A well-behaved client (another source address: ::1) still gets byte-exact echoes.
            conn = await Peer(echo=True).connect("::1", srv.port, tls(pki, "connector"))
            assert isinstance(await conn.register(Role.CONNECTOR, "echo"), RegistrationAck)
            rc, r = await cli_client("--server", f"[::1]:{srv.port}", "--pki", str(pki), "--service", "echo",
                                     "--dst", "10.1.2.3:9999", "--send-udp", "still serving", "--repeat", "5",
                                     "--verify-echo", "--send-hex", "2f05ab", "--send-hex", "ff0102")
            assert rc == 0 and r["echoed"] == 5 and r["echo_ok"], str(r)
            await conn.close()
        asyncio.run(flood())
        m = srv.metrics()
        assert m["ztna_quic_non_quic_total"] >= 50
        assert m["ztna_quic_unknown_cid_total"] >= 50
        assert m["ztna_quic_malformed_total"] >= 50
        assert m["ztna_quic_handshakes_rate_limited_total"] > 0
        assert m['ztna_relay_dropped_total{reason="malformed"}'] >= 1
        assert m['ztna_relay_dropped_total{reason="unknown_type"}'] >= 1
    finally:
        assert srv.stop() == 0, srv.log()


# ---------------------------------------------------------------------------- signals

def test_sighup_reload_keeps_old_connections_and_new_ones_use_new_certs(tmp_path: Path) -> None:
    old, new, live = tmp_path / "old", tmp_path / "new", tmp_path / "live"
    init_pki(old, ["echo"])
    init_pki(new, ["echo"])  # a different CA altogether
    shutil.copytree(old, live)
    srv = IntermediateProc(["--cert", str(live / "intermediate.pem"), "--key", str(live / "intermediate.key"),
                            "--ca", str(live / "ca.pem")], tmp_path / "hup.log").start()
    try:
        async def main() -> None:
            agent = await Peer().connect("127.0.0.1", srv.port, tls(old, "agent"))
            assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
            for name in ("intermediate.pem", "intermediate.key", "ca.pem"):
                shutil.copy(new / name, live / name)
            srv.signal(signal.SIGHUP)
            for _ in range(100):
                if "certificates reloaded" in srv.log():
                    break
                await asyncio.sleep(0.05)
            assert "certificates reloaded" in srv.log()
            # The old connection is kept and still answered.
            assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
            assert agent.closed_reason is None
            # New connections use the new certificates; the old CA no longer works.
            rc, r = await cli_client("--server", f"127.0.0.1:{srv.port}", "--pki", str(new), "--service", "echo")
            assert rc == 0 and r["registrations"] == {"echo": "ack"}, r
            rc, r = await cli_client("--server", f"127.0.0.1:{srv.port}", "--pki", str(old), "--timeout", "2")
            assert rc == 1 and not r["connected"], r
            await agent.close()
        asyncio.run(main())
    finally:
        assert srv.stop() == 0, srv.log()


def test_sigterm_drains_and_exits_zero(pki: Path, tmp_path: Path) -> None:
    srv = IntermediateProc(["--pki", str(pki)], tmp_path / "term.log").start()

    async def main() -> None:
        agent = await Peer().connect("127.0.0.1", srv.port, tls(pki, "agent"))
        assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)
        srv.signal(signal.SIGTERM)
        for _ in range(300):
            if agent.closed_reason is not None:
                break
            await asyncio.sleep(0.01)
        assert agent.closed_reason == "server shutting down"
        assert any(isinstance(m, GoAway) for m in agent.messages) or agent.closed_reason
        await agent.close()
    asyncio.run(main())
    assert srv.proc is not None
    assert srv.proc.wait(10) == 0
    assert srv.stop() == 0
    assert "stopped" in srv.log()


def test_config_file_and_bad_values(pki: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg = tmp_path / "i.toml"
    cfg.write_text(f'pki = "{pki}"\nudp_payload = 1100\n')
    p = subprocess.run([sys.executable, "-m", "ztna", "intermediate", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "ztna intermediate: invalid udp_payload = 1100: Input should be greater than or equal to 1200"]
    cfg.write_text(f'pki = "{pki}"\nlisten = ["127.0.0.1:0"]\nmetrics = "off"\nretry = false\nbogus = 1\n')
    p = subprocess.run([sys.executable, "-m", "ztna", "intermediate", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "bogus" in p.stderr
    # A flag overrides the file (listen given on both): the file's value never wins.
    srv = IntermediateProc(["--config", str(cfg), "--udp-payload", "1400"], tmp_path / "cfg.log")
    cfg.write_text(f'pki = "{pki}"\nlisten = ["127.0.0.1:1"]\nudp_payload = 1250\n')
    srv.start()
    try:
        import time

        for _ in range(100):  # the startup line follows /healthz by a loop iteration
            if "ztna intermediate: listening" in srv.log():
                break
            time.sleep(0.05)
        assert "udp payload 1400" in srv.log() and f"[::]:{srv.port}" in srv.log()
    finally:
        assert srv.stop() == 0
    assert os.path.exists(tmp_path / "cfg.log")
