"""ztna.identity: chain verification of certificates made by ztna.certs, and SAN identities."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztna import certs, identity
from ztna.errors import ProtocolError, UsageError
from ztna.identity import (
    CertificateRejected,
    ChainVerifier,
    Identity,
    identity_from_certificate,
    load_ca_file,
)

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(autouse=True)
def _fresh_now() -> None:
    """`NOW` is "now" for each test, not for collection time: in a long suite the PKI is
    made minutes after collection and is only backdated 5 minutes."""
    global NOW
    NOW = dt.datetime.now(dt.UTC)


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    certs.init_pki(d, ["web", "ssh"], [], 30)
    certs.issue(d, "agent", "wild", (), True, (), d / "wild")
    certs.issue(d, "agent", "legacy", (), False, (), d / "legacy", scoped=False)
    return d


@pytest.fixture(scope="module")
def verifier(pki: Path) -> ChainVerifier:
    return ChainVerifier(load_ca_file(pki / "ca.pem"))


def test_agent_cert_verifies_and_is_scoped_to_its_services(
    pki: Path, verifier: ChainVerifier
) -> None:
    leaf = _load(pki / "agent.pem")
    ident = verifier.verify_client(leaf, [], now=NOW)
    assert ident.common_name == "agent"
    assert ident.agent_services == {"web", "ssh"}
    assert ident.connector_services == frozenset()
    assert not ident.agent_wildcard and not ident.connector_wildcard
    assert ident.scoped
    assert ident.fingerprint == leaf.fingerprint(hashes.SHA256()).hex()
    assert ident.allows("agent", "web") and ident.allows("agent", "ssh")
    assert not ident.allows("agent", "db")
    assert not ident.allows("connector", "web")


def test_connector_cert_verifies_as_client_and_as_p2p_server(
    pki: Path, verifier: ChainVerifier
) -> None:
    leaf = _load(pki / "connector.pem")
    ident = verifier.verify_client(leaf, [], now=NOW)
    assert ident.connector_services == {"web", "ssh"} and ident.agent_services == frozenset()
    assert ident.allows("connector", "web") and not ident.allows("agent", "web")
    server_ident = verifier.verify_server(leaf, [], server_name=certs.P2P_SERVER_NAME, now=NOW)
    assert server_ident == ident
    with pytest.raises(CertificateRejected, match="invalid server certificate"):
        verifier.verify_server(leaf, [], server_name="localhost", now=NOW)


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "::1"])
def test_intermediate_cert_verifies_as_server_for_default_hosts(
    pki: Path, verifier: ChainVerifier, name: str
) -> None:
    ident = verifier.verify_server(_load(pki / "intermediate.pem"), [], server_name=name, now=NOW)
    assert not ident.scoped


def test_missing_certificate_is_rejected(verifier: ChainVerifier) -> None:
    with pytest.raises(CertificateRejected) as info:
        verifier.verify_client(None, [], now=NOW)
    assert info.value.reason == "client certificate required"
    assert isinstance(info.value, ProtocolError)


def test_certificate_from_another_ca_is_rejected(
    tmp_path: Path, verifier: ChainVerifier
) -> None:
    certs.init_pki(tmp_path, ["web"], [], 30)
    with pytest.raises(CertificateRejected, match="^invalid client certificate: "):
        verifier.verify_client(_load(tmp_path / "agent.pem"), [], now=NOW)
    # ...and the other CA's own verifier accepts it, so the refusal is about the CA.
    other = ChainVerifier(load_ca_file(tmp_path / "ca.pem"))
    assert other.verify_client(_load(tmp_path / "agent.pem"), [], now=NOW).allows("agent", "web")


def test_expired_and_not_yet_valid_certificates_are_rejected(
    pki: Path, tmp_path: Path, verifier: ChainVerifier
) -> None:
    cert_path, _ = certs.issue(
        pki, "agent", "old", ["web"], False, (), tmp_path / "old",
        not_before=NOW - dt.timedelta(minutes=2), not_after=NOW - dt.timedelta(minutes=1),
    )
    old = _load(cert_path)
    with pytest.raises(CertificateRejected, match="invalid client certificate"):
        verifier.verify_client(old, [], now=NOW)
    # The same certificate was fine while it was valid (the CA is backdated 5 minutes).
    then = NOW - dt.timedelta(seconds=90)
    assert verifier.verify_client(old, [], now=then).allows("agent", "web")
    with pytest.raises(CertificateRejected):
        verifier.verify_client(_load(pki / "agent.pem"), [], now=NOW - dt.timedelta(days=1))


def test_cache_does_not_outlive_the_certificate(pki: Path) -> None:
    v = ChainVerifier(load_ca_file(pki / "ca.pem"))
    leaf = _load(pki / "agent.pem")
    first = v.verify_client(leaf, [], now=NOW)
    assert v.verify_client(leaf, [], now=NOW + dt.timedelta(seconds=1)) is first  # cached
    with pytest.raises(CertificateRejected):
        v.verify_client(leaf, [], now=NOW + dt.timedelta(days=31))  # issued for 30 days


def test_cache_is_bounded(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(identity, "VERIFY_CACHE_MAX", 2)
    v = ChainVerifier(load_ca_file(pki / "ca.pem"))
    for name in ("agent.pem", "connector.pem", "wild.pem"):
        v.verify_client(_load(pki / name), [], now=NOW)
    assert len(v._cache) == 2
    # Evicted entries are simply verified again.
    assert v.verify_client(_load(pki / "agent.pem"), [], now=NOW).allows("agent", "web")


def test_server_only_certificate_cannot_act_as_client(pki: Path, verifier: ChainVerifier) -> None:
    with pytest.raises(CertificateRejected, match="EKU"):
        verifier.verify_client(_load(pki / "intermediate.pem"), [], now=NOW)


def _leaf_signed_by_ca(ca_dir: Path, *, eku: list[x509.ObjectIdentifier] | None,
                       sans: list[x509.GeneralName] | None) -> x509.Certificate:
    ca_cert, ca_key = certs.load_ca(ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "handmade")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(hours=1))
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def test_certificate_without_any_eku_is_rejected(pki: Path, verifier: ChainVerifier) -> None:
    # cryptography's client policy accepts a leaf with no EKU at all; we insist on clientAuth.
    leaf = _leaf_signed_by_ca(pki, eku=None, sans=[x509.DNSName("agent.web.ztna")])
    with pytest.raises(CertificateRejected) as info:
        verifier.verify_client(leaf, [], now=NOW)
    assert info.value.reason == "invalid client certificate: no clientAuth extended key usage"
    ok = _leaf_signed_by_ca(pki, eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                            sans=[x509.DNSName("agent.web.ztna")])
    assert verifier.verify_client(ok, [], now=NOW).allows("agent", "web")


def test_sanless_and_unscoped_certificates_verify_but_are_allowed_nothing(
    pki: Path, verifier: ChainVerifier
) -> None:
    sanless = _leaf_signed_by_ca(pki, eku=[ExtendedKeyUsageOID.CLIENT_AUTH], sans=None)
    for leaf in (sanless, _load(pki / "legacy.pem")):
        ident = verifier.verify_client(leaf, [], now=NOW)
        assert not ident.scoped
        for role in ("agent", "connector"):
            for svc in ("web", "ssh", "*", "anything"):
                assert not ident.allows(role, svc)
        assert "unscoped" in ident.describe()


def test_wildcard_agent(pki: Path, verifier: ChainVerifier) -> None:
    ident = verifier.verify_client(_load(pki / "wild.pem"), [], now=NOW)
    assert ident.agent_wildcard and not ident.connector_wildcard
    assert ident.allows("agent", "web") and ident.allows("agent", "never-heard-of")
    assert not ident.allows("connector", "web")


def test_naive_now_is_a_usage_error(pki: Path, verifier: ChainVerifier) -> None:
    with pytest.raises(UsageError):
        verifier.verify_client(_load(pki / "agent.pem"), [], now=dt.datetime.now())


def _self_signed_with_sans(names: list[str], cn: str | None = "x") -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []
    name = x509.Name(attrs)
    general: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    general.append(x509.UniformResourceIdentifier("spiffe://agent.web.ztna"))
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(NOW).not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .sign(key, hashes.SHA256())
    )


def test_identity_extraction_parses_only_well_formed_ztna_names() -> None:
    cert = _self_signed_with_sans([
        "AGENT.Web.ZTNA",            # lowercased -> agent:web
        "connector.db_1.ztna",       # underscore is a valid service id character
        "connector.*.ztna",          # wildcard
        "agent..ztna",               # empty service: ignored
        "agent.a.b.ztna",            # dotted service: ignored
        "agent.-x.ztna",             # must start alphanumeric: ignored
        "agent." + "s" * 64 + ".ztna",  # 64 > 63 characters: ignored
        "admin.ops.ztna",            # unknown role: ignored
        "agent.web.ztna.evil.com",   # not under .ztna: ignored
        "ztna",                      # no role: ignored
        "localhost",
    ], cn="mixed")
    ident = identity_from_certificate(cert)
    assert ident == Identity(
        common_name="mixed",
        agent_services=frozenset({"web"}),
        connector_services=frozenset({"db_1"}),
        agent_wildcard=False,
        connector_wildcard=True,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
    )
    assert ident.scoped


def test_identity_without_cn_or_ztna_names() -> None:
    ident = identity_from_certificate(_self_signed_with_sans(["localhost"], cn=None))
    assert ident.common_name == "" and not ident.scoped


ALLOWS_TABLE = [
    # (agent services, connector services, agent *, connector *, role, service, expected)
    ({"web"}, set(), False, False, "agent", "web", True),
    ({"web"}, set(), False, False, "agent", "WEB", True),  # DNS SANs are case-insensitive
    ({"web"}, set(), False, False, "agent", "ssh", False),
    ({"web"}, set(), False, False, "connector", "web", False),
    (set(), {"web"}, False, False, "connector", "web", True),
    (set(), {"web"}, False, False, "agent", "web", False),
    (set(), set(), True, False, "agent", "any", True),
    (set(), set(), True, False, "connector", "any", False),
    (set(), set(), False, True, "connector", "any", True),
    (set(), set(), False, False, "agent", "web", False),  # unscoped: nothing
    (set(), set(), False, False, "connector", "web", False),
]


@pytest.mark.parametrize("agent,conn,aw,cw,role,service,expected", ALLOWS_TABLE)
def test_allows_table(agent: set[str], conn: set[str], aw: bool, cw: bool, role: str,
                      service: str, expected: bool) -> None:
    ident = Identity("cn", frozenset(agent), frozenset(conn), aw, cw, "00")
    assert ident.allows(role, service) is expected


def test_allows_unknown_role_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        Identity("cn", frozenset({"web"}), frozenset(), False, False, "00").allows("admin", "web")


def test_load_ca_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read"):
        load_ca_file(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(UsageError):
        load_ca_file(tmp_path / "junk.pem")
    with pytest.raises(UsageError):
        ChainVerifier([])
