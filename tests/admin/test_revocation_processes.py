"""Revocation against real processes: `--revoked FILE` on the Intermediate and on the
Connector's P2P server. A revoked identity's live connections are closed at once on SIGHUP
with a clear reason, its new handshakes are refused, everyone else keeps being served, and
a bad list is exit 2 at start / keeps the old list on reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from admin_world import PY, TcpEcho, World, echo_roundtrip, free_port, http, metrics, wait_for
from cryptography import x509

from ztna.certs import init_pki, issue


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    issue(d, "agent", "bob", ["web"])
    return d


def _serial(pem: Path) -> str:
    return f"{x509.load_pem_x509_certificate(pem.read_bytes()).serial_number:x}"


def _served(port: int) -> bool:
    try:
        data = os.urandom(2000)
        return echo_roundtrip(port, data) == data
    except OSError:
        return False


def test_bad_revocation_file_is_exit_2(pki: Path, tmp_path: Path) -> None:
    bad = tmp_path / "revoked.txt"
    bad.write_text("serial 12ab\nrevoke everyone\n")
    for argv in (["intermediate", "--pki", str(pki), "--listen", "127.0.0.1:0", "--metrics", "off"],
                 ["connector", "--intermediate", "127.0.0.1:1", "--pki", str(pki), "--metrics", "off",
                  "--service", "web=10.100.0.2;tcp:80=127.0.0.1:1"]):
        res = subprocess.run([PY, "-m", "ztna", *argv, "--revoked", str(bad)], capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 2, res.stderr
        assert f"{bad}:2: expected 'serial HEX'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = subprocess.run([PY, "-m", "ztna", "intermediate", "--pki", str(pki), "--listen", "127.0.0.1:0",
                          "--metrics", "off", "--revoked", str(tmp_path / "missing.txt")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "cannot read revocation list" in res.stderr, res.stderr


def test_intermediate_revokes_identity_and_serial(pki: Path, tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("# nothing revoked yet\n")
    backend = TcpEcho()
    world = World(tmp=tmp_path, pki=pki)
    alice_fwd, bob_fwd = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    try:
        world.intermediate("--revoked", str(revoked))
        mport = world.ports["intermediate_metrics"]
        world.connector("c1", [f"web=10.100.0.2;tcp:80=127.0.0.1:{backend.port}"])
        world.agent("alice", alice_fwd)
        world.agent("bob", bob_fwd, cert="bob")
        wait_for(lambda: _served(alice_fwd) and _served(bob_fwd), 40, "both agents served")
        held = socket.create_connection(("127.0.0.1", bob_fwd), timeout=10)
        assert echo_roundtrip(bob_fwd, b"before", held) == b"before"

        # A reload with a typo keeps the old list (nobody is cut off) and says so.
        revoked.write_text("identity bob\nbogus line\n")
        world.signal("intermediate")
        wait_for(lambda: "revocation list reload failed" in world.log("intermediate"), 10, "reload error")
        assert _served(bob_fwd)
        assert metrics(mport)['ztna_revocation_reloads_total{result="failed"}'] == 1

        revoked.write_text("# bob's laptop was stolen\nidentity bob\n")
        world.signal("intermediate")
        wait_for(lambda: "identity revoked (bob)" in world.log("intermediate"), 10, "bob's connections closed")
        m = metrics(mport)
        assert m['ztna_revocations_total{action="closed"}'] >= 1
        # The open flow ends at once (the stream goes with the connection).
        held.settimeout(10)
        try:
            rest = held.recv(100)
        except OSError:
            rest = b""
        assert rest == b""
        held.close()
        # Bob comes back and is refused at the handshake, with the reason; Alice is untouched.
        wait_for(lambda: metrics(mport)['ztna_revocations_total{action="refused"}'] >= 1, 30, "bob refused")
        assert "refusing" in world.log("intermediate") and "(bob): identity revoked (bob)" in world.log("intermediate")
        assert not _served(bob_fwd)
        assert _served(alice_fwd)
        wait_for(lambda: "identity revoked (bob)" in world.log("bob"), 20, "bob's log names the reason")

        # By serial: the Connector's own certificate (as `ztna certs show` prints it).
        revoked.write_text(f"identity bob\nserial {_serial(pki / 'connector.pem')}\n")
        world.signal("intermediate")
        wait_for(lambda: "certificate revoked (serial" in world.log("intermediate"), 10, "connector closed")
        wait_for(lambda: not _served(alice_fwd), 20, "service gone with its only Connector")
        assert metrics(mport)["ztna_revocation_list_entries"] == 2
        world.alive()
    finally:
        world.stop()
        backend.close()


def test_connector_p2p_server_refuses_and_closes_revoked_agents(pki: Path, tmp_path: Path) -> None:
    revoked = tmp_path / "connector-revoked.txt"
    revoked.write_text("identity bob\n")
    backend = TcpEcho()
    world = World(tmp=tmp_path, pki=pki)
    alice_fwd, bob_fwd = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
    admin = f"http://127.0.0.1:{free_port(socket.SOCK_STREAM)}"
    try:
        world.intermediate("--admin", admin.removeprefix("http://"))
        world.connector("c1", [f"web=10.100.0.2;tcp:80=127.0.0.1:{backend.port}"], "--revoked", str(revoked),
                        p2p=True)
        cport = world.ports["c1_metrics"]
        world.agent("alice", alice_fwd)
        # A punch that fails under load is retried after the cooldown: keep it short.
        world.agent("bob", bob_fwd, "--p2p-cooldown", "10", cert="bob")

        def path(name: str) -> str | None:
            snap = world.status(name)
            return snap["services"][0].get("path") if snap else None
        # Alice goes direct. Bob's direct handshake is refused by the Connector, so he stays
        # on the relay (the Intermediate does not revoke him) and is still served.
        wait_for(lambda: path("alice") == "direct", 40, "alice direct")
        wait_for(lambda: metrics(cport)['ztna_revocations_total{action="refused"}'] >= 1, 60,
                 "bob's direct handshake refused")
        assert "identity revoked (bob)" in world.log("c1")
        assert path("bob") == "relay" and _served(bob_fwd)
        # The admin API knows the paths from the punch results, and alice's warm-up.
        (web,) = http(f"{admin}/api/v1/services")[1]
        paths = {a["identity"]: a for a in web["agents"]}
        assert paths["agent"]["path"] == "direct" and paths["agent"]["warmup_ms"] > 0
        assert paths["bob"]["path"] == "relay" and paths["bob"]["warmup_ms"] is None
        assert http(f"{admin}/api/v1/histograms")[1]["warmup"]["count"] >= 1

        # Revoke Alice on the Connector: her direct connection is closed at once; her traffic
        # goes on through the relay.
        assert _served(alice_fwd)
        revoked.write_text("identity bob\nidentity agent\n")
        world.signal("c1", signal.SIGHUP)
        wait_for(lambda: metrics(cport)['ztna_revocations_total{action="closed"}'] == 1, 10, "alice closed")
        assert "identity revoked (agent)" in world.log("c1")
        wait_for(lambda: path("alice") == "relay", 30, "alice back on the relay")
        wait_for(lambda: _served(alice_fwd), 30, "alice served through the relay")
        world.alive()
    finally:
        world.stop()
        backend.close()
