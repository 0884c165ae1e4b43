"""ztna.certs and `ztna certs`: the files, their modes and contents, and that they work in TLS."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import subprocess
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

ZTNA = Path("/work/venv/bin/ztna")
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
    now = dt.datetime.now(dt.timezone.utc)
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
    now = dt.datetime.now(dt.timezone.utc)
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
        [str(ZTNA), "certs", "init", str(d), "--service", "web", "--host", "127.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert _mode(d / "ca.key") == 0o600
    v = ChainVerifier(load_ca_file(d / "ca.pem"))
    ident = v.verify_client(_load(d / "agent.pem"), [], now=dt.datetime.now(dt.timezone.utc))
    assert ident.allows("agent", "web")
