"""Start-up checks shared by the three programs: config files, TLS files, bound addresses.

Each check turns an operator's mistake into ONE line that names the file or the address and
says what is wrong with it, raised as `UsageError` (the CLI prints it and exits 2). Doing it
before anything runs matters: a bad key found later surfaces as a raw PEM error, an endless
reconnect loop, or a server that runs but can never accept anyone.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from ztna.addresses import format_address
from ztna.errors import UsageError

__all__ = ["BindError", "bind_error", "check_tls_files", "check_tls_files_apart", "read_toml"]


def read_toml(path: str | Path) -> dict[str, Any]:
    """The TOML document in ``path``; UsageError naming the file when it is missing,
    unreadable, not UTF-8 or not TOML."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"config file {str(p)!r} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {str(p)!r}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"config file {str(p)!r} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                         f"at offset {exc.start}); TOML files must be UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {str(p)!r} is not valid TOML: {exc}") from None


def _read(label: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{label} file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{label} file {str(path)!r} is a directory, not a file") from None
    except OSError as exc:
        raise UsageError(f"{label} file {str(path)!r} cannot be read: {exc.strerror or exc}") from None


def check_tls_files(cert: str | Path | None, key: str | Path | None, ca: str | Path) -> None:
    """Every TLS file is readable and parses as PEM, and the key belongs to the certificate.

    The first problem found is raised as a UsageError naming the file and the reason."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_path = Path(ca)
    try:
        x509.load_pem_x509_certificates(_read("CA", ca_path))
    except ValueError:
        raise UsageError(f"CA file {str(ca_path)!r} holds no valid PEM certificate") from None
    if cert is None or key is None:
        return
    cert_path, key_path = Path(cert), Path(key)
    try:
        leaf = x509.load_pem_x509_certificates(_read("certificate", cert_path))[0]
    except ValueError:
        raise UsageError(f"certificate file {str(cert_path)!r} holds no valid PEM "
                         "certificate") from None
    key_data = _read("key", key_path)
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise UsageError(f"key file {str(key_path)!r} is encrypted; ztna needs an unencrypted "
                         "key (mode 0600)") from None
    except ValueError as exc:  # TypeError (an encrypted key) is answered above
        why = "no PEM private key in it" if b"-----BEGIN" not in key_data else str(exc).split("\n")[0]
        raise UsageError(f"key file {str(key_path)!r} is not a valid private key: {why}") from None
    der = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if private.public_key().public_bytes(enc, der) != leaf.public_key().public_bytes(enc, der):
        raise UsageError(f"key file {str(key_path)!r} does not belong to certificate "
                         f"{str(cert_path)!r} (their public keys differ)")


_CHECK_CHILD = (
    "import sys\n"
    "from ztna.errors import UsageError\n"
    "from ztna.startup import check_tls_files\n"
    "try:\n"
    "    check_tls_files(sys.argv[1] or None, sys.argv[2] or None, sys.argv[3])\n"
    "except UsageError as exc:\n"
    "    print(exc)\n"
    "    sys.exit(2)\n"
)


def check_tls_files_apart(cert: str | Path | None, key: str | Path | None, ca: str | Path) -> None:
    """`check_tls_files` in a short-lived child process, for long-running programs that
    verify certificates natively afterwards: cryptography stays resident once imported (about
    10 MB of the Agent's RSS). Same UsageError; checked in this process if the child cannot
    run at all."""
    try:
        proc = subprocess.run([sys.executable, "-c", _CHECK_CHILD, str(cert or ""), str(key or ""), str(ca)],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        check_tls_files(cert, key, ca)
        return
    if proc.returncode == 2 and proc.stdout.strip():
        raise UsageError(proc.stdout.strip().splitlines()[-1])
    if proc.returncode != 0:
        check_tls_files(cert, key, ca)


class BindError(UsageError):
    """A socket could not be bound: the message names what, the address and the port."""


def bind_error(what: str, proto: str, host: str, port: int, exc: OSError) -> BindError:
    """One line for a failed bind, e.g.
    ``cannot bind udp [::]:4433 (listen address): address already in use``."""
    if exc.errno == errno.EADDRINUSE:
        why = "address already in use (another program, or another instance, holds it)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = "no such local address on this machine"
    elif exc.errno == errno.EACCES:
        why = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    else:
        why = (exc.strerror or str(exc)).lower()
    return BindError(f"cannot bind {proto} {format_address((host, port))} ({what}): {why}")
