"""A tiny PKI for ztna: one CA and the certificates the three programs need (no openssl).

Theory of operation
-------------------
`init_pki(dir, services, hosts, days)` creates a fresh CA and issues, from it, one certificate
for each program; `issue(...)` issues more later from the same CA directory. The layout:

    ca.pem / ca.key                    the trust anchor (ca.key stays with the operator)
    intermediate.pem / .key            QUIC server: SANs = every --host (DNS or IP), EKU serverAuth
    agent.pem / .key                   CN agent, SAN agent.<svc>.ztna per service, EKU clientAuth
    connector.pem / .key               CN connector, SAN connector.<svc>.ztna per service plus
                                       connector.ztna, EKU clientAuth AND serverAuth: the
                                       Connector is a client of the Intermediate and the QUIC
                                       server for direct P2P connections from Agents.

Not written by `init`, issued on demand: a cluster member's mesh certificate (`issue --role
member`), CN the member's name, SAN intermediate.ztna, EKU clientAuth: the client identity an
Intermediate of a cluster dials the other members with (its server certificate stays
server-only).

What the verifier needs (checked by tests/test_identity.py): `ztna.identity.ChainVerifier`
uses cryptography's webpki policy, which requires on the CA BasicConstraints(ca) critical and
KeyUsage keyCertSign; on the leaf AuthorityKeyIdentifier, BasicConstraints(ca=False), EKU with
the right purpose and (for server certs) a SAN naming the host. We add SubjectKeyIdentifier
everywhere so chains can be built by key id.

Keys are EC P-256, signatures SHA-256, serials random (RFC 5280 positive ≤ 20 bytes), validity
starts 5 minutes in the past (clock skew) and lasts `days` (the CA: 10 years). Files are
written atomically (temp file + rename); private keys are created 0600 with O_EXCL so they are
never readable by others, not even for a moment; certificates are 0644.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztna.errors import UsageError
from ztna.identity import WILDCARD
from ztna.wire.service_id import validate_service_id

__all__ = [
    "CA_DAYS",
    "DEFAULT_DAYS",
    "DEFAULT_HOSTS",
    "ISSUE_ROLES",
    "P2P_SERVER_NAME",
    "INTERMEDIATE_SAN",
    "init_pki",
    "issue",
    "load_ca",
    "ztna_san",
]

DEFAULT_DAYS: Final = 365
CA_DAYS: Final = 3650
BACKDATE: Final = dt.timedelta(minutes=5)
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1", "::1")
# The name Agents verify when they connect directly (P2P) to a Connector's QUIC server.
P2P_SERVER_NAME: Final = "connector.ztna"
# The SAN that makes a certificate's holder a cluster member (ztna.identity, the mesh).
INTERMEDIATE_SAN: Final = "intermediate.ztna"
ISSUE_ROLES: Final = ("agent", "connector", "intermediate", "member")


def ztna_san(role: str, service: str) -> str:
    """The SAN DNS name granting `role` for `service` (`*` for every service)."""
    return f"{role}.{service}.ztna"


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host):
        raise UsageError(f"invalid --host {host!r}: need a DNS name or an IP address")
    return x509.DNSName(host.lower())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ztna"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _validity(
    days: int, not_before: dt.datetime | None, not_after: dt.datetime | None
) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise UsageError(f"--days must be at least 1 (got {days})")
    start = not_before if not_before is not None else dt.datetime.now(dt.UTC) - BACKDATE
    end = not_after if not_after is not None else start + BACKDATE + dt.timedelta(days=days)
    if end <= start:
        raise UsageError("certificate would expire before it becomes valid")
    return start, end


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    # A random suffix keeps two PKIs apart in logs and in `ztna certs show`.
    name = _name(f"ztna CA {secrets.token_hex(4)}")
    start, end = _validity(days, None, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _role_profile(
    role: str, services: Sequence[str], wildcard: bool, hosts: Sequence[str], scoped: bool
) -> tuple[list[x509.GeneralName], list[x509.ObjectIdentifier]]:
    """(SANs, EKUs) for a role. Validates the combination."""
    if role not in ISSUE_ROLES:
        raise UsageError(f"unknown role {role!r}: expected one of {ISSUE_ROLES}")
    for s in services:
        validate_service_id(s)
    sans: list[x509.GeneralName] = []
    if role == "intermediate":
        if services or wildcard:
            raise UsageError("an intermediate certificate carries no services")
        sans = [_host_san(h) for h in (hosts or DEFAULT_HOSTS)]
        return sans, [ExtendedKeyUsageOID.SERVER_AUTH]
    if role == "member":
        if services or wildcard or hosts:
            raise UsageError("a member certificate carries no services or hosts")
        return [x509.DNSName(INTERMEDIATE_SAN)], [ExtendedKeyUsageOID.CLIENT_AUTH]
    if scoped:
        if wildcard and services:
            raise UsageError("--wildcard excludes --service")
        if not services and not wildcard:
            raise UsageError(f"a {role} certificate needs --service (or --wildcard, or --no-scope)")
        names = [WILDCARD] if wildcard else list(dict.fromkeys(services))
        sans = [x509.DNSName(ztna_san(role, s)) for s in names]
    elif services or wildcard:
        raise UsageError("--no-scope excludes --service and --wildcard")
    ekus = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "connector":
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
        sans.append(x509.DNSName(P2P_SERVER_NAME))
        sans.extend(_host_san(h) for h in hosts)
    elif hosts:
        raise UsageError("--host applies to intermediate and connector certificates only")
    return sans, ekus


def _make_leaf(
    cn: str,
    sans: list[x509.GeneralName],
    ekus: list[x509.ObjectIdentifier],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    start: dt.datetime,
    end: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not cn or len(cn) > 64:
        raise UsageError("--name must be 1..64 characters")
    key = _new_key()
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(ca_key, hashes.SHA256()), key


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 for certs)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_pair(
    prefix: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path = prefix.with_name(prefix.name + ".pem")
    key_path = prefix.with_name(prefix.name + ".key")
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, _cert_pem(cert), 0o644)
    return cert_path, key_path


def load_ca(ca_dir: str | Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key from `ca_dir/ca.pem` and `ca_dir/ca.key`."""
    d = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
    except OSError as exc:
        raise UsageError(f"cannot read the CA in {d}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"invalid CA files in {d}: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{d / 'ca.key'} is not an EC private key")
    return cert, key


def issue(
    ca_dir: str | Path,
    role: str,
    name: str,
    services: Iterable[str] = (),
    wildcard: bool = False,
    hosts: Iterable[str] = (),
    out_prefix: str | Path | None = None,
    scoped: bool = True,
    *,
    days: int = DEFAULT_DAYS,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue one certificate from the CA in `ca_dir`; write `<prefix>.pem` and `<prefix>.key`.

    `out_prefix` defaults to `ca_dir/<name>`. `scoped=False` makes a certificate with no ztna
    SAN (the server must refuse its registrations). `not_before`/`not_after` override the
    validity (tests use them to make expired certificates). Returns (cert path, key path).
    """
    sans, ekus = _role_profile(role, list(services), wildcard, list(hosts), scoped)
    ca_cert, ca_key = load_ca(ca_dir)
    start, end = _validity(days, not_before, not_after)
    cert, key = _make_leaf(name, sans, ekus, ca_cert, ca_key, start, end)
    prefix = Path(out_prefix) if out_prefix is not None else Path(ca_dir) / name
    prefix.parent.mkdir(parents=True, exist_ok=True)
    return _write_pair(prefix, cert, key)


def init_pki(
    directory: str | Path,
    services: Sequence[str],
    hosts: Sequence[str] = (),
    days: int = DEFAULT_DAYS,
    *,
    force: bool = False,
) -> dict[str, Path]:
    """Create a CA plus intermediate/agent/connector certificates in `directory`.

    Refuses (UsageError) to replace an existing CA unless `force`. Returns name -> path for
    every file written: ca, ca_key, intermediate, intermediate_key, agent, agent_key, ...
    """
    if not services:
        raise UsageError("init needs at least one --service")
    if days < 1:
        raise UsageError(f"--days must be at least 1 (got {days})")
    for s in services:
        validate_service_id(s)
    hosts = list(hosts) or list(DEFAULT_HOSTS)
    for h in hosts:
        _host_san(h)
    d = Path(directory)
    if not force and ((d / "ca.pem").exists() or (d / "ca.key").exists()):
        raise UsageError(f"{d} already holds a CA (ca.pem/ca.key); use --force to replace it")
    d.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _make_ca(CA_DAYS if days <= CA_DAYS else days)
    written: dict[str, Path] = {}
    written["ca"], written["ca_key"] = _write_pair(d / "ca", ca_cert, ca_key)
    for role, name, role_hosts in (
        ("intermediate", "intermediate", hosts),
        ("agent", "agent", []),
        ("connector", "connector", []),
    ):
        svc = [] if role == "intermediate" else list(services)
        written[name], written[f"{name}_key"] = issue(
            d, role, name, svc, False, role_hosts, d / name, days=days
        )
    return written
