"""ztna.certs and `ztna certs`: the files, their modes and contents, and that they work in TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID as EKU

from ztna import certs
from ztna.cli.certs import certs as certs_cli
from ztna.errors import UsageError
from ztna.identity import ChainVerifier, load_ca_file

# The `ztna` of the interpreter running the tests (whatever venv or clone that is).
ZTNA = [sys.executable, "-m", "ztna"]
FILES = ["ca", "intermediate", "agent", "connector"]


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _sans(cert: x509.Certificate) -> list[object]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [n.value for n in san]


def _ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_077() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_init_writes_every_file_with_the_right_mode(tmp_path: Path, umask_077: None) -> None:
    written = certs.init_pki(tmp_path / "pki", ["web"], [], 365)
    assert set(written) == {f"{n}{s}" for n in FILES for s in ("", "_key")}
    for name in FILES:
        assert written[name] == tmp_path / "pki" / f"{name}.pem"
        assert written[f"{name}_key"] == tmp_path / "pki" / f"{name}.key"
        assert _mode(written[name]) == 0o644  # despite umask 077
        assert _mode(written[f"{name}_key"]) == 0o600
    # Atomic writes leave no temp files behind.
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == sorted(
        f"{n}.{e}" for n in FILES for e in ("pem", "key")
    )


def test_init_contents(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    w = certs.init_pki(tmp_path, ["web", "ssh"], [], 365)
    ca = _load(w["ca"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= dt.timedelta(days=3650)

    inter = _load(w["intermediate"])
    assert _sans(inter) == [
        "localhost", ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    ]
    assert _ekus(inter) == {EKU.SERVER_AUTH}

    agent = _load(w["agent"])
    assert agent.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "agent"
    assert _sans(agent) == ["agent.web.ztna", "agent.ssh.ztna"]
    assert _ekus(agent) == {EKU.CLIENT_AUTH}

    conn = _load(w["connector"])
    assert _sans(conn) == ["connector.web.ztna", "connector.ssh.ztna", "connector.ztna"]
    assert _ekus(conn) == {EKU.CLIENT_AUTH, EKU.SERVER_AUTH}

    serials = set()
    for name in FILES:
        cert = _load(w[name])
        key = serialization.load_pem_private_key(w[f"{name}_key"].read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        assert key.curve.name == "secp256r1"
        assert key.public_key() == cert.public_key()
        assert cert.signature_hash_algorithm is not None
        assert cert.signature_hash_algorithm.name == "sha256"
        assert cert.issuer == ca.subject
        # Backdated about 5 minutes for clock skew.
        assert now - dt.timedelta(minutes=6) < cert.not_valid_before_utc < now
        serials.add(cert.serial_number)
        if name != "ca":
            assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(
                days=365, minutes=5
            )
    assert len(serials) == 4


def test_init_with_hosts(tmp_path: Path) -> None:
    w = certs.init_pki(tmp_path, ["web"], ["Relay.Example.com", "203.0.113.5", "2001:db8::1"], 10)
    assert _sans(_load(w["intermediate"])) == [
        "relay.example.com",
        ipaddress.ip_address("203.0.113.5"),
        ipaddress.ip_address("2001:db8::1"),
    ]
    v = ChainVerifier(load_ca_file(w["ca"]))
    now = dt.datetime.now(dt.UTC)
    for name in ("relay.example.com", "203.0.113.5", "2001:db8::1"):
        v.verify_server(_load(w["intermediate"]), [], server_name=name, now=now)


def test_init_refuses_to_overwrite_a_ca_unless_forced(tmp_path: Path) -> None:
    w = certs.init_pki(tmp_path, ["web"], [], 30)
    before = w["ca"].read_bytes()
    with pytest.raises(UsageError, match="--force"):
        certs.init_pki(tmp_path, ["web"], [], 30)
    assert w["ca"].read_bytes() == before
    certs.init_pki(tmp_path, ["web"], [], 30, force=True)
    assert w["ca"].read_bytes() != before
    with pytest.raises(UsageError, match="--days"):
        certs.init_pki(tmp_path / "new", ["web"], [], 0)
    assert not (tmp_path / "new").exists()
    with pytest.raises(UsageError, match="--service"):
        certs.init_pki(tmp_path / "new", [], [], 30)


def test_issue_more_certificates(tmp_path: Path) -> None:
    certs.init_pki(tmp_path, ["web"], [], 30)
    cert_path, key_path = certs.issue(tmp_path, "agent", "alice", ["web", "db"], False, (),
                                      tmp_path / "out" / "alice")
    assert (cert_path, key_path) == (tmp_path / "out/alice.pem", tmp_path / "out/alice.key")
    assert _mode(key_path) == 0o600
    alice = _load(cert_path)
    assert _sans(alice) == ["agent.web.ztna", "agent.db.ztna"]
    w, _ = certs.issue(tmp_path, "connector", "c2", (), True, ["10.0.0.7"], tmp_path / "c2")
    assert _sans(_load(w)) == [
        "connector.*.ztna", "connector.ztna", ipaddress.ip_address("10.0.0.7")
    ]
    u, _ = certs.issue(tmp_path, "agent", "legacy", (), False, (), tmp_path / "legacy",
                       scoped=False)
    with pytest.raises(x509.ExtensionNotFound):
        _load(u).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert _ekus(_load(u)) == {EKU.CLIENT_AUTH}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(role="agent", services=[]), "needs --service"),
        (dict(role="agent", services=["web"], wildcard=True), "excludes --service"),
        (dict(role="agent", services=["web"], scoped=False), "--no-scope"),
        (dict(role="agent", services=["bad.name"]), "invalid service id"),
        (dict(role="agent", services=["web"], hosts=["h"]), "--host"),
        (dict(role="intermediate", services=["web"]), "no services"),
        (dict(role="admin", services=["web"]), "unknown role"),
        (dict(role="agent", services=["web"], days=0), "--days"),
    ],
)
def test_issue_rejects_bad_combinations(tmp_path: Path, kwargs: dict, match: str) -> None:
    certs.init_pki(tmp_path, ["web"], [], 30)
    args = dict(name="x", services=[], wildcard=False, hosts=(), out_prefix=tmp_path / "x")
    args.update(kwargs)
    with pytest.raises(UsageError, match=match):
        certs.issue(tmp_path, **args)
    assert not (tmp_path / "x.pem").exists()


def test_issue_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the CA"):
        certs.issue(tmp_path, "agent", "a", ["web"], False, (), tmp_path / "a")


def test_cli_init_show_issue(tmp_path: Path) -> None:
    runner = CliRunner()
    d = tmp_path / "pki"
    r = runner.invoke(certs_cli, ["init", str(d), "--service", "web", "--service", "ssh",
                                  "--days", "7"])
    assert r.exit_code == 0, r.output
    assert "agent.key" in r.output and "600" in r.output
    assert f"ztna certs show {d}/agent.pem" in r.output
    assert _sans(_load(d / "agent.pem")) == ["agent.web.ztna", "agent.ssh.ztna"]

    r = runner.invoke(certs_cli, ["init", str(d), "--service", "web"])
    assert r.exit_code == 2 and "already holds a CA" in r.output

    r = runner.invoke(certs_cli, ["issue", "--ca", str(d), "--role", "agent", "--name", "w",
                                  "--wildcard", "--out", str(d / "w")])
    assert r.exit_code == 0, r.output
    assert _sans(_load(d / "w.pem")) == ["agent.*.ztna"]

    r = runner.invoke(certs_cli, ["issue", "--ca", str(d), "--role", "agent", "--name", "n",
                                  "--no-scope", "--out", str(d / "n")])
    assert r.exit_code == 0, r.output

    r = runner.invoke(certs_cli, ["issue", "--ca", str(d), "--role", "agent", "--name", "e",
                                  "--out", str(d / "e")])
    assert r.exit_code == 2 and "needs --service" in r.output

    r = runner.invoke(certs_cli, ["show", str(d / "connector.pem")], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "connector.web.ztna" in r.output
    assert "CN=connector connector:{ssh,web}" in r.output
    assert "clientAuth, serverAuth" in r.output and "(valid)" in r.output

    r = runner.invoke(certs_cli, ["show", str(d / "n.pem")], terminal_width=200)
    assert "unscoped: allowed nothing" in r.output


def test_installed_command_init(tmp_path: Path) -> None:
    d = tmp_path / "pki"
    proc = subprocess.run(
        [*ZTNA, "certs", "init", str(d), "--service", "web", "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert _mode(d / "ca.key") == 0o600
    v = ChainVerifier(load_ca_file(d / "ca.pem"))
    ident = v.verify_client(_load(d / "agent.pem"), [], now=dt.datetime.now(dt.UTC))
    assert ident.allows("agent", "web")


def _handshake(pki: Path, client_cert: str | None, server_cert: str, server_name: str,
               monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    """An in-memory aioquic handshake (no sockets) with the server requesting a client cert."""
    from aioquic import tls
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    original_init = tls.Context.__init__

    def requesting_init(self: tls.Context, *args: object, **kwargs: object) -> None:
        original_init(self, *args, **kwargs)  # type: ignore[arg-type]
        if not self._is_client:
            # aioquic sends CertificateRequest only with this private flag (quic-libraries §3.5).
            self._request_client_certificate = True

    monkeypatch.setattr(tls.Context, "__init__", requesting_init)
    ccfg = QuicConfiguration(is_client=True, alpn_protocols=["ztna-test"],
                             server_name=server_name)
    ccfg.load_verify_locations(cafile=str(pki / "ca.pem"))
    if client_cert is not None:
        ccfg.load_cert_chain(pki / f"{client_cert}.pem", pki / f"{client_cert}.key")
    scfg = QuicConfiguration(is_client=False, alpn_protocols=["ztna-test"])
    scfg.load_cert_chain(pki / f"{server_cert}.pem", pki / f"{server_cert}.key")
    client = QuicConnection(configuration=ccfg)
    server = QuicConnection(
        configuration=scfg,
        original_destination_connection_id=client.original_destination_connection_id,
    )
    now = 1000.0
    client.connect(("127.0.0.1", 4433), now=now)
    for _ in range(20):
        moved = False
        for data, _addr in client.datagrams_to_send(now=now):
            server.receive_datagram(data, ("127.0.0.1", 5555), now=now)
            moved = True
        for data, _addr in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("127.0.0.1", 4433), now=now)
            moved = True
        if not moved:
            break
        now += 0.01
    return client, server


@pytest.mark.parametrize(
    "client_cert,server_cert,server_name",
    [
        ("agent", "intermediate", "localhost"),
        ("connector", "intermediate", "127.0.0.1"),
        ("agent", "connector", certs.P2P_SERVER_NAME),  # direct P2P: Agent -> Connector
    ],
)
def test_certificates_work_in_an_aioquic_mtls_handshake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_cert: str, server_cert: str,
    server_name: str,
) -> None:
    certs.init_pki(tmp_path, ["web"], [], 30)
    client, server = _handshake(tmp_path, client_cert, server_cert, server_name, monkeypatch)
    assert client._handshake_complete and server._handshake_complete  # type: ignore[attr-defined]
    peer = server.tls._peer_certificate  # type: ignore[attr-defined]
    chain = server.tls._peer_certificate_chain  # type: ignore[attr-defined]
    assert peer == _load(tmp_path / f"{client_cert}.pem")
    ident = ChainVerifier(load_ca_file(tmp_path / "ca.pem")).verify_client(
        peer, chain, now=dt.datetime.now(dt.UTC))
    assert ident.allows(client_cert, "web")


def test_aioquic_handshake_failures_are_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ztna.identity import CertificateRejected

    certs.init_pki(tmp_path, ["web"], [], 30)
    # The Intermediate's certificate does not name the P2P server: the aioquic client refuses.
    client, _ = _handshake(tmp_path, "agent", "intermediate", certs.P2P_SERVER_NAME, monkeypatch)
    assert not client._handshake_complete  # type: ignore[attr-defined]
    # No client certificate: aioquic's server completes anyway (the reason ChainVerifier exists).
    client, server = _handshake(tmp_path, None, "intermediate", "localhost", monkeypatch)
    assert server._handshake_complete  # type: ignore[attr-defined]
    peer = server.tls._peer_certificate  # type: ignore[attr-defined]
    assert peer is None
    with pytest.raises(CertificateRejected, match="client certificate required"):
        ChainVerifier(load_ca_file(tmp_path / "ca.pem")).verify_client(
            peer, [], now=dt.datetime.now(dt.UTC)
        )
