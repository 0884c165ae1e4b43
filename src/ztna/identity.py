"""Peer identity from mTLS certificates: chain verification and SAN-based authorisation.

Theory of operation
-------------------
The TLS layer of every ztna QUIC server (rustls in the native core) checks only that the
client owns the key of the certificate it presents; the chain, its validity and the SANs are
decided here, in one place, so every refusal gets ztna's own close code and counter. Once the
handshake completes (or, for a resumed session, as soon as its ClientHello is read), the
endpoint hands the peer's leaf and intermediates to `ChainVerifier.verify_client(..., now=...)`,
which

1. rejects a missing certificate ("client certificate required"),
2. verifies the chain with `cryptography.x509.verification` against our CA(s) at time `now`
   (signatures, validity, basic constraints, key usage, the webpki extension rules),
3. requires an ExtendedKeyUsage extension containing clientAuth (the library only checks
   EKU when it is present; we insist on it so a server-only cert cannot act as a client),
4. returns the `Identity` derived from the leaf's SANs.

Every failure is a `CertificateRejected` (a `ProtocolError`: bad peer input, never fatal to a
server), whose `reason` is what the server logs and puts in its close reason.

Identity and authorisation
--------------------------
SAN DNS names `agent.<svc>.ztna` / `connector.<svc>.ztna` grant a role for one service;
`agent.*.ztna` / `connector.*.ztna` grant the role for every service. Names are lowercased (DNS
is case-insensitive) and `allows()` compares service ids case-insensitively for the same reason:
a certificate cannot tell `Web` from `web`. `intermediate.ztna` marks a cluster member (the
Intermediates' mesh links); it grants no service. Anything else in the SAN is ignored.

Unlike the original (original-system.md §3.4, "no ZTNA SAN means allow everything", and
DEFECT-6 "SANs only enforced with a flag"), an *unscoped* certificate is allowed **nothing**:
`allows()` is False for every (role, service). Authorisation is always on.

The chain verifier relaxes one webpki rule: the leaf may lack a SubjectAltName extension
(webpki requires one), so that a legacy, SAN-less certificate from our CA reaches the clear
"unscoped" refusal at registration instead of an obscure chain error.

Caching: reconnecting clients present the same chain, so successful verifications are
memoised per (leaf, intermediates) fingerprint together with the chain's validity window; a
cached entry is used only while `now` lies inside that window. The cache is bounded
(`VERIFY_CACHE_MAX`, oldest evicted) because its keys come from peers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ztna.errors import ProtocolError, UsageError
from ztna.wire.service_id import is_valid_service_id

__all__ = [
    "ROLES",
    "VERIFY_CACHE_MAX",
    "CertificateRejected",
    "ChainVerifier",
    "Identity",
    "certificate_fingerprint",
    "certificate_problem_hint",
    "is_own_verification_failure",
    "identity_from_certificate",
    "load_ca_file",
]

ROLES: Final = ("agent", "connector")
SAN_SUFFIX: Final = ".ztna"
WILDCARD: Final = "*"

# Bounded because keys come from peers. 1024 distinct client chains is more than one
# Intermediate sees between restarts in practice; beyond that the oldest entry is evicted.
VERIFY_CACHE_MAX: Final = 1024


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """sha256 of the DER encoding, lowercase hex (what `ztna certs show` prints)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def stable_peer_id(fingerprint: str, instance: int) -> int:
    """The 32-bit agent id of one client process: blake2b(cert fingerprint + `Hello.instance`).

    The Intermediate assigns it to a connection on `Hello` (the id in 0x30/0x31), and the
    Connector derives the same id for a direct P2P connection from that connection's `Hello`,
    so a flow keyed by (agent id, inner 5-tuple) is the same flow on either path."""
    digest = hashlib.blake2b(fingerprint.encode() + instance.to_bytes(8, "big"), digest_size=8).digest()
    return int.from_bytes(digest[:4], "big") or 1


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a certificate says its holder is, and what it may register for."""

    common_name: str
    agent_services: frozenset[str]
    connector_services: frozenset[str]
    agent_wildcard: bool
    connector_wildcard: bool
    fingerprint: str
    # SAN `intermediate.ztna`: a member of an Intermediate cluster (the mesh), nothing else.
    intermediate: bool = False
    # The certificate's serial number, what a revocation list may name; not part of what the
    # identity *is* (equality and hashing stay those of the names and the fingerprint).
    serial: int = field(default=0, compare=False)

    @property
    def scoped(self) -> bool:
        """True if the certificate carries at least one ztna SAN."""
        return bool(
            self.agent_services
            or self.connector_services
            or self.agent_wildcard
            or self.connector_wildcard
        )

    def allows(self, role: str, service: str) -> bool:
        """May the holder register as `role` ("agent" | "connector") for `service`?

        Unscoped certificates are allowed nothing (the original allowed everything).
        """
        if role == "agent":
            return self.agent_wildcard or service.lower() in self.agent_services
        if role == "connector":
            return self.connector_wildcard or service.lower() in self.connector_services
        raise UsageError(f"unknown role {role!r}: expected one of {ROLES}")

    def describe(self) -> str:
        """One line for logs: `CN=agent agent:{web,ssh} connector:*`."""
        parts = [f"CN={self.common_name or '-'}"]
        for role, services, wild in (
            ("agent", self.agent_services, self.agent_wildcard),
            ("connector", self.connector_services, self.connector_wildcard),
        ):
            if wild:
                parts.append(f"{role}:*")
            elif services:
                parts.append(f"{role}:{{{','.join(sorted(services))}}}")
        if self.intermediate:
            parts.append("cluster member (intermediate.ztna: mesh links only)")
        elif not self.scoped:
            parts.append("(unscoped: allowed nothing)")
        return " ".join(parts)


def _parse_ztna_san(name: str) -> tuple[str, str] | None:
    """`agent.web.ztna` -> ("agent", "web"); `agent.*.ztna` -> ("agent", "*"); else None."""
    name = name.lower()
    if not name.endswith(SAN_SUFFIX):
        return None
    role, dot, service = name[: -len(SAN_SUFFIX)].partition(".")
    if not dot or role not in ROLES:
        return None
    if service == WILDCARD or is_valid_service_id(service):
        return role, service
    return None  # empty, dotted or otherwise invalid service part: ignored


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """Derive the Identity from a (verified) leaf certificate. Never raises on odd SANs."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = cns[0].value if cns else ""
    common_name = cn if isinstance(cn, str) else cn.decode("utf-8", "replace")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    services: dict[str, set[str]] = {role: set() for role in ROLES}
    wild = {role: False for role in ROLES}
    intermediate = any(dns.lower() == "intermediate" + SAN_SUFFIX for dns in dns_names)
    for dns in dns_names:
        parsed = _parse_ztna_san(dns)
        if parsed is None:
            continue
        role, service = parsed
        if service == WILDCARD:
            wild[role] = True
        else:
            services[role].add(service)
    return Identity(
        common_name=common_name,
        agent_services=frozenset(services["agent"]),
        connector_services=frozenset(services["connector"]),
        agent_wildcard=wild["agent"],
        connector_wildcard=wild["connector"],
        fingerprint=certificate_fingerprint(cert),
        intermediate=intermediate,
        serial=cert.serial_number,
    )


class CertificateRejected(ProtocolError):
    """The peer's certificate (chain) is missing or not acceptable. `reason` is loggable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _has_eku(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return oid in eku


def _utc(now: dt.datetime) -> dt.datetime:
    if now.tzinfo is None:
        raise UsageError("now must be a timezone-aware datetime (UTC)")
    return now.astimezone(dt.UTC)


def _ee_policy() -> ExtensionPolicy:
    # webpki defaults, except that the leaf's SAN may be absent (see module docstring).
    return ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: Identity
    valid_from: dt.datetime  # latest not_before in the chain
    valid_until: dt.datetime  # earliest not_after in the chain


class ChainVerifier:
    """Verifies peer chains against a fixed set of CA certificates (the trust anchors)."""

    def __init__(self, ca_certs: list[x509.Certificate]) -> None:
        if not ca_certs:
            raise UsageError("ChainVerifier needs at least one CA certificate")
        self._store = Store(list(ca_certs))
        self._cache: dict[tuple[str, ...], _Verified] = {}

    def verify_client(
        self,
        leaf: x509.Certificate | None,
        intermediates: list[x509.Certificate],
        *,
        now: dt.datetime,
    ) -> Identity:
        """The Identity of a client whose chain verifies at `now`; else CertificateRejected."""
        if leaf is None:
            raise CertificateRejected("client certificate required")
        now = _utc(now)
        key = ("client", certificate_fingerprint(leaf)) + tuple(
            certificate_fingerprint(c) for c in intermediates
        )
        hit = self._cache.get(key)
        if hit is not None and hit.valid_from <= now <= hit.valid_until:
            return hit.identity
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=_ee_policy()
            )
            .build_client_verifier()
        )
        try:
            chain = verifier.verify(leaf, list(intermediates)).chain
        except VerificationError as exc:
            raise CertificateRejected(f"invalid client certificate: {_why(exc)}") from None
        if not _has_eku(leaf, ExtendedKeyUsageOID.CLIENT_AUTH):
            raise CertificateRejected(
                "invalid client certificate: no clientAuth extended key usage"
            )
        return self._remember(key, leaf, chain)

    def verify_server(
        self,
        leaf: x509.Certificate | None,
        intermediates: list[x509.Certificate],
        *,
        server_name: str,
        now: dt.datetime,
    ) -> Identity:
        """Verify a server chain for `server_name` (DNS name or IP literal) at `now`."""
        if leaf is None:
            raise CertificateRejected("server certificate required")
        now = _utc(now)
        subject: x509.verification.Subject
        try:
            subject = x509.IPAddress(ipaddress.ip_address(server_name))
        except ValueError:
            subject = x509.DNSName(server_name)
        key = ("server", server_name, certificate_fingerprint(leaf)) + tuple(
            certificate_fingerprint(c) for c in intermediates
        )
        hit = self._cache.get(key)
        if hit is not None and hit.valid_from <= now <= hit.valid_until:
            return hit.identity
        verifier = PolicyBuilder().store(self._store).time(now).build_server_verifier(subject)
        try:
            chain = verifier.verify(leaf, list(intermediates))
        except VerificationError as exc:
            raise CertificateRejected(f"invalid server certificate: {_why(exc)}") from None
        return self._remember(key, leaf, chain)

    def _remember(
        self, key: tuple[str, ...], leaf: x509.Certificate, chain: list[x509.Certificate]
    ) -> Identity:
        verified = _Verified(
            identity=identity_from_certificate(leaf),
            valid_from=max(c.not_valid_before_utc for c in chain),
            valid_until=min(c.not_valid_after_utc for c in chain),
        )
        if len(self._cache) >= VERIFY_CACHE_MAX:
            del self._cache[next(iter(self._cache))]
        self._cache[key] = verified
        return verified.identity


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS and IP subject alternative names of `cert`, as `DNS:name` / `IP:addr`."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return ([f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
            + [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)])


def server_name_mismatch(cert: x509.Certificate | None, server_name: str) -> str | None:
    """None when `cert` holds `server_name` (an IP literal must be an IP SAN, a DNS name a
    DNS SAN, `*.` matching one label), else a sentence naming what was expected and what the
    certificate holds. Only explains a failed handshake: the TLS layer did the verification."""
    if cert is None:
        return None
    names = certificate_names(cert)
    try:
        ip = ipaddress.ip_address(server_name.split("%")[0])
    except ValueError:
        ip = None
    if ip is not None:
        if any(n.startswith("IP:") and ipaddress.ip_address(n[3:]) == ip for n in names):
            return None
        wanted = f"IP:{ip}"
    else:
        host = server_name.rstrip(".").lower()
        for n in names:
            if not n.startswith("DNS:"):
                continue
            pat = n[4:].rstrip(".").lower()
            if pat == host or (pat.startswith("*.") and host.partition(".")[2] == pat[2:]
                               and host.partition(".")[0]):
                return None
        wanted = f"DNS:{host}"
    return (f"expected {wanted}, the certificate holds "
            f"{', '.join(names) if names else 'no DNS or IP names'}")


def _why(exc: VerificationError) -> str:
    # cryptography's messages end with "(encountered processing <Certificate(...)>)": drop it.
    text = str(exc).removeprefix("validation failed: ")
    return text.split(" (encountered processing", 1)[0]


# What a peer or our own TLS stack says when a certificate is not accepted: the refusals our
# servers send (`CertificateRejected` reasons, the unscoped-certificate close) and the TLS
# library's verification failures of the server's chain.
_REFUSALS: Final = (
    "client certificate required",
    "invalid client certificate",
    "invalid server certificate",
    "certificate has no ztna service san",
    "certificate verify failed",
    "unable to get local issuer certificate",
    "bad certificate",
    "bad_certificate",
    "unknown ca",
    "unknown_ca",
    "doesn't match",
)
# ... of which these come from our own check of the server's chain or name.
_OWN_CHECK: Final = ("invalid server certificate", "certificate verify failed",
                     "unable to get local issuer certificate", "doesn't match")


def is_own_verification_failure(reason: str) -> bool:
    """True when ``reason`` says WE could not verify the server (not that it refused us)."""
    text = reason.lower()
    return any(r in text for r in _OWN_CHECK)


def certificate_problem_hint(reason: str) -> str | None:
    """A hint for the operator when ``reason`` (a close reason or handshake error) says a
    certificate was refused; None for any other reason."""
    text = reason.lower()
    if not any(r in text for r in _REFUSALS):
        return None
    if "doesn't match" in text:
        return ("the Intermediate's certificate does not carry the name we dialled: give "
                "--server-name with a name it does carry (see `ztna certs show intermediate.pem`)")
    if "no ztna service san" in text:
        return ("the certificate carries no agent.<service>.ztna name: issue it with "
                "`ztna certs issue ... --service NAME`; see `ztna certs show FILE`")
    return ("was this certificate issued by the same CA as the Intermediate's? compare the "
            "issuers and fingerprints with `ztna certs show` on both sides")


def load_ca_file(path: str | Path) -> list[x509.Certificate]:
    """All certificates in a PEM file (a CA bundle). UsageError if missing, unreadable or empty."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read CA file {p}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise UsageError(f"CA file {p} holds no valid PEM certificate: {exc}") from None
    return certs

