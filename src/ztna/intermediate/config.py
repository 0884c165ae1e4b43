"""The Intermediate's configuration: one pydantic model fed by a TOML file and CLI flags.

Precedence: a flag given on the command line beats the TOML file, which beats the defaults
below (never the reverse, and no positional arguments). Unknown keys in the file
are an error (a typo must not silently fall back to a default). Every validation failure is
turned into ONE line naming the field and the offending value (`ConfigError`), which the CLI
prints and exits 2 with.

Example file (all keys optional)::

    listen = ["[::]:4433"]
    pki = "/etc/ztna/pki"          # or cert/key/ca
    metrics = "127.0.0.1:9090"     # or "off"
    retry = true
    max_connections = 10000
    handshakes_per_second = 20
    max_registrations = 64
    udp_payload = 1350
    log_level = "info"
    cluster = "redis://10.0.0.5:6379/0"   # join a cluster (with advertise)
    advertise = "203.0.113.7:4433"         # how the other members reach this one
    revoked = "/etc/ztna/revoked.txt"   # deny-list, reloaded on SIGHUP
    admin = "127.0.0.1:9443"           # admin API + dashboard; default off
    admin_token_file = "/etc/ztna/admin.token"   # needed for a non-loopback admin address
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ztna import limits
from ztna.errors import UsageError


class ConfigError(UsageError):
    """Bad configuration; the message is one line naming the field and the value."""


def parse_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT`, `V4:PORT` (or bare host when a default port is given)."""
    s = text.strip()
    host: str
    port_s: str | None
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise ValueError(f"unbalanced '[' in {text!r}")
        host, rest = s[1:end], s[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':PORT' after ']' in {text!r}")
        port_s = rest[1:] if rest else None
    elif s.count(":") == 1:
        host, port_s = s.split(":")
    elif s.count(":") > 1:
        # A bare IPv6 address (no port) — only valid with a default port.
        host, port_s = s, None
    else:
        host, port_s = s, None
    if port_s is None:
        if default_port is None:
            raise ValueError(f"missing port in {text!r} (HOST:PORT, [IPv6]:PORT)")
        port = default_port
    else:
        if not port_s.isdigit():
            raise ValueError(f"bad port {port_s!r} in {text!r}")
        port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} out of range in {text!r}")
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if ":" in host:
        ipaddress.IPv6Address(host.split("%")[0])  # raises ValueError
    return host, port


def format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class IntermediateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: list[str] = Field(default_factory=lambda: [f"[::]:{limits.INTERMEDIATE_PORT}"])
    pki: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    metrics: str = f"127.0.0.1:{limits.INTERMEDIATE_METRICS_PORT}"
    retry: bool = True
    insecure_no_client_auth: bool = False
    insecure_allow_unscoped_certs: bool = False
    max_connections: int = Field(default=limits.MAX_CONNECTIONS, ge=1, le=1_000_000)
    handshakes_per_second: float = Field(default=limits.HANDSHAKES_PER_SOURCE_PER_SECOND, gt=0)
    max_registrations: int = Field(default=limits.MAX_REGISTRATIONS_PER_CONNECTION, ge=1, le=100_000)
    udp_payload: int = Field(
        default=limits.DEFAULT_QUIC_UDP_PAYLOAD,
        ge=limits.MIN_QUIC_UDP_PAYLOAD,
        le=limits.MAX_QUIC_UDP_PAYLOAD,
    )
    keylog: Path | None = None
    qlog: Path | None = None
    state_dir: Path | None = None       # 0-RTT ticket store + address-token key (0600 files)
    zero_rtt: bool = True
    log_level: str = "info"
    cluster: str | None = None          # redis://HOST:PORT/DB shared by every member
    advertise: str | None = None        # HOST:PORT of this member, as the others reach it
    revoked: Path | None = None         # deny-list of serials/identities (ztna.revocation)
    admin: str | None = None            # admin API + dashboard, HOST:PORT (off by default)
    admin_token_file: Path | None = None
    # Per-flow audit log of relayed TCP streams (docs/intermediate.md "Audit log"); None = off.
    audit_log: Path | None = None
    audit_log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096)
    audit_log_backups: int = Field(default=5, ge=0, le=1000)
    audit_interval: float = Field(default=5.0, gt=0, le=24 * 60)   # minutes

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one listen address is needed")
        for item in value:
            parse_host_port(item)
        return value

    @field_validator("metrics")
    @classmethod
    def _metrics(cls, value: str) -> str:
        if value.strip().lower() != "off":
            parse_host_port(value)
        return value

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str | None) -> str | None:
        if value is not None:
            from ztna.cluster.url import parse_store_url

            parse_store_url(value)
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        if value is not None:
            host, port = parse_host_port(value)
            if port == 0:
                raise ValueError("port 0 cannot be reached by the other members")
            try:
                unspecified = ipaddress.ip_address(host.split("%")[0]).is_unspecified
            except ValueError:
                unspecified = False   # a DNS name
            if unspecified:
                raise ValueError("a wildcard address cannot be reached by the other members")
        return value

    @model_validator(mode="after")
    def _membership(self) -> IntermediateConfig:
        if self.cluster is not None and self.advertise is None:
            raise ValueError("cluster needs advertise (HOST:PORT the other members reach this one at)")
        if self.advertise is not None and self.cluster is None:
            raise ValueError("advertise only makes sense with cluster")
        return self

    @field_validator("admin")
    @classmethod
    def _admin(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() != "off":
            parse_host_port(value)
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        v = value.lower()
        if v not in ("debug", "info", "warning", "error"):
            raise ValueError("must be debug, info, warning or error")
        return v

    @model_validator(mode="after")
    def _tls(self) -> IntermediateConfig:
        explicit = [self.cert, self.key, self.ca]
        if any(p is not None for p in explicit) and not all(p is not None for p in explicit):
            if self.pki is None:
                raise ValueError("cert, key and ca must be given together (or use pki)")
        if self.pki is None and not all(p is not None for p in explicit):
            raise ValueError("no certificates: give pki (a `ztna certs init` directory) or cert, key and ca")
        admin = self.admin_address()
        if admin is not None and self.admin_token_file is None:
            from ztna.intermediate.admin.http import is_loopback

            if not is_loopback(admin[0]):
                raise ValueError(f"admin API on {self.admin}, not a loopback address, needs "
                                 "admin_token_file (--admin-token-file)")
        return self

    # ------------------------------------------------------------------ derived
    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_host_port(x) for x in self.listen]

    def metrics_address(self) -> tuple[str, int] | None:
        if self.metrics.strip().lower() == "off":
            return None
        return parse_host_port(self.metrics)

    def admin_address(self) -> tuple[str, int] | None:
        if self.admin is None or self.admin.strip().lower() == "off":
            return None
        return parse_host_port(self.admin)

    def tls_paths(self) -> tuple[Path, Path, Path]:
        """(cert, key, ca): explicit paths win over the pki directory."""
        d = self.pki
        cert = self.cert or (d / "intermediate.pem" if d else None)
        key = self.key or (d / "intermediate.key" if d else None)
        ca = self.ca or (d / "ca.pem" if d else None)
        assert cert is not None and key is not None and ca is not None
        return cert, key, ca


def _one_line(exc: ValidationError, data: dict[str, Any]) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "config"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["loc"]:
        key = err["loc"][0]
        value = data.get(str(key), err.get("input"))
        return f"invalid {loc} = {value!r}: {msg}"
    return f"invalid configuration: {msg}"


def load_config(path: str | Path | None, overrides: dict[str, Any]) -> IntermediateConfig:
    """Build the config from an optional TOML file plus flag overrides (None = not given)."""
    data: dict[str, Any] = {}
    if path is not None:
        from ztna.startup import read_toml

        try:
            data = read_toml(path)
        except UsageError as exc:
            raise ConfigError(str(exc)) from None
        data = {k.replace("-", "_"): v for k, v in data.items()}
    for key, value in overrides.items():
        if value is None or value == ():
            continue
        data[key] = list(value) if isinstance(value, tuple) else value
    try:
        return IntermediateConfig(**data)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, data)) from None
