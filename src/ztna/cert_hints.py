"""Operator hints for certificate refusals, from the text of a close reason or TLS error.

Pure string matching, no cryptography: the Agent explains a refused certificate with these
on every failed connection, and a long-running process should not load cryptography (about
10 MB resident for good) just to say why. `ztna.identity` re-exports both functions.
"""

from __future__ import annotations

from typing import Final

__all__ = ["certificate_problem_hint", "is_own_verification_failure"]

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
