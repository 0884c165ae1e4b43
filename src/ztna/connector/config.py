"""Connector configuration: a TOML file and/or command-line flags, validated by pydantic.

Every error names the offending field and value (`services.0.tcp.80: ...`). The service
flag syntax (docs/connector.md) is one string per service:

    ID=VIP|PATTERN[,VIP|PATTERN...][;tcp:PORT[=[HOST]:PORT]][;udp:PORT=HOST:PORT][;icmp=on|off][;check=CHECK]...

with CHECK one of `none`, `tcp`, `http:PORT[/PATH][=STATUS]`, `udp:PORT:PAYLOADHEX=REPLYHEX`
(PORT: a virtual port of that protocol; see `HealthCheck`).

e.g. `web=10.100.0.2,fd00:100::2;tcp:80=127.0.0.1:8080;udp:53=127.0.0.1:5353`.
Hosts may be IPs (IPv6 in brackets) or names; names are resolved when the backend is used.
A service may also (or instead) be reached by DNS name: `corp=*.corp.test,git.corp.test;
tcp:80;tcp:443=:8443` covers the names those patterns match (`ztna.names.patterns`);
a stream that names one is connected to that name, resolved here, on the port the entry
maps to (`tcp:80` alone: the same port; `=:8443`: port 8443; `=HOST:PORT`: that port, the
host being for virtual-IP streams only). An entry without a host serves named streams
only.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ztna import limits
from ztna.errors import DecodeError, UsageError
from ztna.names.patterns import DomainPattern, is_name_like, parse_patterns
from ztna.wire.service_id import validate_service_id

__all__ = [
    "HostPort", "HealthCheck", "ServiceConfig", "ConnectorConfig", "ConnectorLimits", "parse_host_port",
    "parse_service_flag", "load_config", "format_validation_error",
]


def parse_host_port(text: str, *, allow_port_zero: bool = False,
                    default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port` or `v4:port` → (host, port); with `default_port`, a bare
    `host` / `[v6]` too (the Agent accepts the same spellings). Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or (text[end + 1 : end + 2] != ":" and not (default_port and end == len(text) - 1)):
            raise ValueError(f"expected [IPv6]:port, got {text!r}")
        host, port_s = text[1:end], text[end + 2 :] or str(default_port)
        ipaddress.IPv6Address(host.split("%")[0])
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep and default_port and port_s:
            host, port_s = port_s, str(default_port)
        elif not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise ValueError(f"IPv6 addresses need brackets: [{host}]:{port_s}")
    if not port_s.isdigit():
        raise ValueError(f"bad port in {text!r}")
    port = int(port_s)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} out of range in {text!r}")
    if not _valid_host(host):
        raise ValueError(f"bad host {host!r}")
    return host, port


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%")[0])
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    return bool(host) and len(host) <= 253 and all(
        0 < len(lab) <= 63 and lab.replace("-", "").isalnum() and not lab.startswith("-")
        for lab in labels
    )


class HostPort(BaseModel):
    model_config = ConfigDict(frozen=True)
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _to_host_port(value: Any, *, allow_zero: bool = False, default_port: int | None = None) -> Any:
    if isinstance(value, str):
        host, port = parse_host_port(value, allow_port_zero=allow_zero, default_port=default_port)
        return {"host": host, "port": port}
    return value


class HealthCheck(BaseModel):
    """One health check of a service's backend. `tcp` without a port checks every TCP
    backend (the default for a service with TCP backends); `http` sends GET `path` to the
    backend of TCP virtual port `port` and wants `status`; `udp` sends `probe` (hex) to the
    backend of UDP virtual port `port` and wants exactly `expect` (hex) back."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["tcp", "http", "udp"]
    port: int | None = Field(default=None, ge=1, le=65535)
    path: str = "/"
    status: int = Field(default=200, ge=100, le=599)
    probe: str = ""
    expect: str = ""
    interval: float = Field(default=2.0, gt=0, le=3600)
    timeout: float = Field(default=1.5, gt=0, le=60)
    fall: int = Field(default=3, ge=1, le=100)
    rise: int = Field(default=2, ge=1, le=100)

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or any(c.isspace() or not c.isprintable() for c in v):
            raise ValueError(f"http path must start with / and have no spaces, got {v!r}")
        return v

    @field_validator("probe", "expect")
    @classmethod
    def _hex(cls, v: str) -> str:
        try:
            bytes.fromhex(v)
        except ValueError:
            raise ValueError(f"expected hex bytes, got {v!r}") from None
        return v.lower().replace(" ", "")

    @model_validator(mode="after")
    def _complete(self) -> HealthCheck:
        if self.kind in ("http", "udp") and self.port is None:
            raise ValueError(f"a {self.kind} check needs the virtual port of its backend")
        if self.kind == "udp" and (not self.probe or not self.expect):
            raise ValueError("a udp check needs a probe payload and an expected reply (hex)")
        return self


def parse_check(text: str) -> list[dict[str, Any]]:
    """`none` | `tcp` | `http:PORT[/PATH][=STATUS]` | `udp:PORT:PAYLOADHEX=REPLYHEX` (ValueError)."""
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.lower()
    if kind == "none" and not rest:
        return []
    if kind == "tcp":
        return [{"kind": "tcp", **({"port": rest} if rest else {})}]
    if kind == "http" and rest:
        target, _, status = rest.partition("=")
        slash = target.find("/")
        port, path = (target, "/") if slash < 0 else (target[:slash], target[slash:])
        return [{"kind": "http", "port": port, "path": path, **({"status": status} if status else {})}]
    if kind == "udp" and rest:
        port, sep, probe = rest.partition(":")
        payload, sep2, expect = probe.partition("=")
        if not sep or not sep2:
            raise ValueError(f"expected udp:PORT:PAYLOADHEX=REPLYHEX, got {text!r}")
        return [{"kind": "udp", "port": port, "probe": payload, "expect": expect}]
    raise ValueError(f"check must be none, tcp, http:PORT[/PATH][=STATUS] or "
                     f"udp:PORT:PAYLOADHEX=REPLYHEX, got {text!r}")


class ServiceConfig(BaseModel):
    """One service: its virtual IPs and/or DNS patterns and, per protocol, virtual port →
    backend (a TCP backend with host "" means "the name the stream asked for")."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    virtual_ips: list[str] = Field(default_factory=list)
    domains: list[str] = Field(default_factory=list)
    tcp: dict[int, HostPort] = Field(default_factory=dict)
    udp: dict[int, HostPort] = Field(default_factory=dict)
    icmp: bool = True
    # None: the default, a TCP connect check of every TCP backend; [] : no checks.
    checks: list[HealthCheck] | None = None

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        try:
            validate_service_id(v)
        except (DecodeError, UsageError) as exc:
            raise ValueError(f"invalid service id {v!r}: {exc}") from None
        return v

    @field_validator("virtual_ips")
    @classmethod
    def _vips(cls, v: list[str]) -> list[str]:
        out = []
        for ip in v:
            try:
                out.append(str(ipaddress.ip_address(ip.strip())))
            except ValueError:
                raise ValueError(f"not an IP address: {ip!r}") from None
        if len(set(out)) != len(out):
            raise ValueError(f"duplicate virtual IP in {v!r}")
        return out

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        try:
            return [str(p) for p in parse_patterns(v)]
        except DecodeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("tcp", "udp", mode="before")
    @classmethod
    def _backends(cls, v: Any, info: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for port, backend in v.items():
            try:
                p = int(port)
            except (TypeError, ValueError):
                raise ValueError(f"virtual port {port!r} is not a number") from None
            if not 1 <= p <= 65535:
                raise ValueError(f"virtual port {p} out of range 1..65535")
            if isinstance(backend, str) and (not backend.strip() or backend.strip().startswith(":")):
                if info.field_name != "tcp":
                    raise ValueError(f"udp port {p}: needs HOST:PORT (names are for TCP only)")
                mapped = backend.strip()[1:] or str(p)
                if not mapped.isdigit() or not 1 <= int(mapped) <= 65535:
                    raise ValueError(f"tcp port {p}: bad port in {backend!r}")
                out[p] = {"host": "", "port": int(mapped)}
                continue
            out[p] = _to_host_port(backend)
        return out

    @model_validator(mode="after")
    def _something(self) -> ServiceConfig:
        if not self.virtual_ips and not self.domains:
            raise ValueError(f"service {self.id!r} has neither virtual IPs nor DNS patterns")
        if not self.tcp and not self.udp and not self.icmp:
            raise ValueError(f"service {self.id!r} exposes nothing (no tcp, udp or icmp)")
        if not self.virtual_ips and not self.tcp:
            raise ValueError(f"service {self.id!r} is reached by name only and needs a tcp:PORT")
        if not self.virtual_ips and (self.udp or any(b.host for b in self.tcp.values())):
            raise ValueError(f"service {self.id!r} is reached by name only: udp and tcp:PORT=HOST:PORT "
                             "need virtual IPs (write tcp:PORT or tcp:PORT=:PORT)")
        for check in self.checks or ():
            backends = self.udp if check.kind == "udp" else self.tcp
            if check.port is not None and check.port not in backends:
                proto = "udp" if check.kind == "udp" else "tcp"
                raise ValueError(f"{check.kind} check of service {self.id!r}: no {proto} "
                                 f"backend on virtual port {check.port}")
            if check.port is not None and not backends[check.port].host:
                raise ValueError(f"{check.kind} check of service {self.id!r}: tcp:{check.port} is "
                                 "reached by name only, there is no fixed backend to check")
        return self

    def health_checks(self) -> list[HealthCheck]:
        """The checks to run: the configured ones, or by default one TCP connect check
        per TCP backend (UDP backends are not checked unless configured)."""
        # An entry without a host (names only) has no fixed backend: each named stream
        # resolves its own, so there is nothing to check ahead of time.
        fixed = sorted(p for p, b in self.tcp.items() if b.host)
        if self.checks is None:
            return [HealthCheck(kind="tcp", port=p) for p in fixed]
        out: list[HealthCheck] = []
        for check in self.checks:
            if check.kind == "tcp" and check.port is None:
                out.extend(check.model_copy(update={"port": p}) for p in fixed)
            else:
                out.append(check)
        return out

    @property
    def patterns(self) -> tuple[DomainPattern, ...]:
        return parse_patterns(self.domains)

    @property
    def packed_vips(self) -> frozenset[bytes]:
        return frozenset(ipaddress.ip_address(ip).packed for ip in self.virtual_ips)


class ConnectorLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    udp_flows_total: int = Field(default=8192, ge=1)
    udp_flows_per_service: int = Field(default=2048, ge=1)
    udp_idle_timeout: float = Field(default=60.0, gt=0)
    tcp_sessions: int = Field(default=4096, ge=1)
    tcp_syn_per_source_per_second: float = Field(default=50.0, gt=0)
    tcp_connect_timeout: float = Field(default=10.0, gt=0)
    tcp_buffer: int = Field(default=256 * 1024, ge=16 * 1024)
    streams: int = Field(default=4096, ge=1)
    flow_control: bool = True   # off only for benchmarks: read everything, ignore budgets


class ConnectorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    intermediate: HostPort
    # Every Intermediate given (`intermediate = "A,B,…"`: members of one cluster), in order of
    # preference; empty means just `intermediate` (the first). The relay link fails over along it.
    intermediates: list[HostPort] = Field(default_factory=list)
    # "one": one relay link, on the first reachable of `intermediates`, failing over along
    # them; "all": one link to each, all at once (services survive the loss of any one).
    attach: Literal["one", "all"] = "one"
    server_name: str | None = None      # TLS name to verify; default: the intermediate host
    # Names this Connector among those sharing its certificate (its Hello to the Intermediate):
    # a restart under the same name replaces the old registration at once; Connectors of one
    # pool that share a certificate need distinct names. Default: the host name.
    name: str | None = Field(default=None, min_length=1, max_length=255)
    cert: Path
    key: Path
    ca: Path
    services: list[ServiceConfig] = Field(min_length=1)
    p2p_host: str = "::"
    p2p_port: int | None = Field(default=limits.CONNECTOR_P2P_PORT, ge=0, le=65535)
    relay_host: str = "::"
    relay_port: int = Field(default=limits.CONNECTOR_RELAY_PORT, ge=0, le=65535)
    metrics: HostPort | None = HostPort(host="127.0.0.1", port=limits.CONNECTOR_METRICS_PORT)
    # Where names of DNS-pattern services are resolved: None = the system resolver.
    dns_server: HostPort | None = None
    log_level: str = "info"
    udp_payload: int = Field(default=limits.DEFAULT_QUIC_UDP_PAYLOAD,
                             ge=limits.MIN_QUIC_UDP_PAYLOAD, le=limits.MAX_QUIC_UDP_PAYLOAD)
    limits: ConnectorLimits = Field(default_factory=ConnectorLimits)
    # Deny-list for direct (P2P) connections from Agents (ztna.revocation), reloaded on SIGHUP.
    revoked: Path | None = None
    # Per-flow audit log (JSON lines, docs/connector.md "Audit log"); None = off.
    audit_log: Path | None = None
    audit_log_max_bytes: int = Field(default=10 * 1024 * 1024, ge=4096)
    audit_log_backups: int = Field(default=5, ge=0, le=1000)
    audit_interval_minutes: float = Field(default=5.0, gt=0, le=24 * 60)

    @model_validator(mode="before")
    @classmethod
    def _several(cls, data: Any) -> Any:
        inter = data.get("intermediate") if isinstance(data, dict) else None
        if isinstance(inter, str) and "," in inter:
            parts = [p.strip() for p in inter.split(",") if p.strip()]
            data = {**data, "intermediate": parts[0] if parts else "",
                    "intermediates": [_to_host_port(p, default_port=limits.INTERMEDIATE_PORT) for p in parts]}
        return data

    @field_validator("intermediate", mode="before")
    @classmethod
    def _inter(cls, v: Any) -> Any:
        return _to_host_port(v, default_port=limits.INTERMEDIATE_PORT)

    @field_validator("dns_server", mode="before")
    @classmethod
    def _dns(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.lower() in ("system", "")):
            return None
        host_port = _to_host_port(v, default_port=53)
        if isinstance(host_port, dict):
            try:
                ipaddress.ip_address(host_port["host"])
            except ValueError:
                raise ValueError(f"dns_server must be an IP address, got {v!r}") from None
        return host_port

    @field_validator("metrics", mode="before")
    @classmethod
    def _metrics(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.lower() in ("off", "none", "")):
            return None
        return _to_host_port(v, allow_zero=True)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError(f"log level {v!r}: expected debug, info, warning or error")
        return v.lower()

    @field_validator("cert", "key", "ca")
    @classmethod
    def _exists(cls, v: Path) -> Path:
        if v.is_dir():
            raise ValueError(f"{str(v)!r} is a directory, not a file")
        if not v.is_file():
            raise ValueError(f"file not found: {str(v)!r}")
        return v

    @model_validator(mode="after")
    def _unique(self) -> ConnectorConfig:
        seen: set[str] = set()
        for s in self.services:
            if s.id.lower() in seen:
                raise ValueError(f"service id {s.id!r} configured twice")
            seen.add(s.id.lower())
        owner: dict[str, str] = {}
        for s in self.services:
            for pat in s.domains:
                if pat in owner:
                    raise ValueError(f"pattern {pat} given to two services ({owner[pat]}, {s.id})")
                owner[pat] = s.id
        if self.p2p_port is not None and self.p2p_port != 0 and self.p2p_port == self.relay_port:
            raise ValueError(f"p2p_port and relay_port must differ (both {self.p2p_port})")
        return self

    def tls_name(self) -> str:
        return self.server_name or self.intermediate.host

    def connector_name(self) -> str:
        import socket

        return self.name or socket.gethostname() or "connector"


def parse_service_flag(text: str) -> dict[str, Any]:
    """`ID=VIP|PATTERN[,..][;tcp:P[=[HOST]:PORT]][;udp:P=HOST:PORT][;icmp=on|off][;check=..]`
    → dict (ValueError)."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts or "=" not in parts[0]:
        raise ValueError(f"expected ID=VIP[,VIP];tcp:PORT=HOST:PORT..., got {text!r}")
    sid, _, vips = parts[0].partition("=")
    entries = [v.strip() for v in vips.split(",") if v.strip()]
    out: dict[str, Any] = {"id": sid.strip(), "virtual_ips": [v for v in entries if not is_name_like(v)],
                           "domains": [v for v in entries if is_name_like(v)], "tcp": {}, "udp": {}}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep and key.strip().lower().startswith("tcp:"):
            sep, value = "=", ""            # tcp:PORT alone: the named host, same port
        if not sep:
            raise ValueError(f"expected KEY=VALUE in {part!r} of {text!r}")
        key = key.strip().lower()
        if key == "check":
            checks = out.setdefault("checks", [])
            checks.extend(parse_check(value))
            continue
        if key == "icmp":
            if value.lower() not in ("on", "off", "true", "false", "yes", "no"):
                raise ValueError(f"icmp must be on or off, got {value!r}")
            out["icmp"] = value.lower() in ("on", "true", "yes")
            continue
        proto, sep, port = key.partition(":")
        if proto not in ("tcp", "udp") or not sep:
            raise ValueError(f"expected tcp:PORT=... or udp:PORT=..., got {part!r}")
        if port in out[proto]:
            raise ValueError(f"{proto} port {port} given twice in {text!r}")
        out[proto][port] = value.strip()
    return out


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                extra_services: list[str] = ()) -> ConnectorConfig:  # type: ignore[assignment]
    """File (if any), then flags on top; `--service` flags add to the file's services.

    Raises UsageError with one line naming the field and the value."""
    data: dict[str, Any] = {}
    if path is not None:
        from ztna.startup import read_toml

        data = read_toml(path)
        if "service" in data and "services" not in data:
            data["services"] = data.pop("service")
    for k, v in (overrides or {}).items():
        if v is not None:
            data[k] = v
    if extra_services:
        services = list(data.get("services", []))
        for i, text in enumerate(extra_services):
            try:
                services.append(parse_service_flag(text))
            except ValueError as exc:
                raise UsageError(f"--service #{i + 1} {text!r}: {exc}") from None
        data["services"] = services
    try:
        return ConnectorConfig.model_validate(data)
    except ValidationError as exc:
        raise UsageError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per error: `field.path: message (value: ...)`, joined with '; '."""
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = "" if isinstance(value, dict | list) or value is None else f" (value: {value!r})"
        out.append(f"{loc}: {msg}{shown}")
    return "; ".join(out)
