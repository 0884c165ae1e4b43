"""Agent configuration: validated once at start-up (pydantic), then read-only.

Everything a user types on the command line ends up in `AgentOptions`; the parsers here turn
the CLI spellings (`web=10.100.0.2,fd00:100::2`, `127.0.0.1:8080=web:80`, `HOST:PORT`) into
typed values and raise `UsageError` with a message that names the offending flag value.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ztna import limits
from ztna.errors import DecodeError, UsageError
from ztna.names.patterns import (
    DomainPattern,
    best_service,
    is_name_like,
    normalize_name,
    parse_patterns,
)
from ztna.names.pool import DEFAULT_POOL_V4, DEFAULT_POOL_V6
from ztna.quic.config import TlsFiles
from ztna.wire.service_id import validate_service_id

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses the Agent gives itself: the TUN's own address (source of routed packets) and the
# synthetic source of userspace UDP packets. Shared address space (RFC 6598) / ULA.
DEFAULT_TUN_V4 = ipaddress.IPv4Address("100.64.0.1")
DEFAULT_TUN_V6 = ipaddress.IPv6Address("fd00:64::1")
# TUN mode with DNS-pattern services: the Agent's DNS responder listens here (an address it
# puts on the TUN device), and answers from these pools (routed into the TUN).
DEFAULT_DNS_V4 = ipaddress.IPv4Address("100.64.0.53")
DEFAULT_DNS_TTL = 30.0


class ServiceSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    virtual_ips: tuple[IpAddress, ...] = ()
    patterns: tuple[DomainPattern, ...] = ()    # DNS names the service is reached by

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        validate_service_id(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> ServiceSpec:
        if not self.virtual_ips and not self.patterns:
            raise ValueError("a service needs at least one virtual IP or DNS pattern")
        return self


class Forward(BaseModel):
    """`-L 127.0.0.1:8080=web:80` (TCP) or `-U 127.0.0.1:5353=dns:53` (UDP)."""

    model_config = ConfigDict(frozen=True)

    listen_host: str
    listen_port: int = Field(ge=0, le=65535)
    target: str          # service id or virtual IP literal
    target_port: int = Field(ge=1, le=65535)


def split_host_port(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """`host:port`, `[v6]:port`, `v6` alone is ambiguous and refused unless bracketed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise UsageError(f"bad address {text!r}: missing ']'")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        raise UsageError(f"bad address {text!r}: write IPv6 as [addr]:port")
    else:
        host, port_text = text, ""
    if not port_text:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: missing port")
        return host, default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"bad port in {text!r}")
    return host, int(port_text)


def parse_service(text: str) -> ServiceSpec:
    """`web=10.100.0.2,fd00:100::2`, `corp=*.corp.test,git.corp.test`, or both mixed."""
    name, sep, ips = text.partition("=")
    if not sep or not ips:
        raise UsageError(f"--service {text!r}: expected ID=IP|PATTERN[,IP|PATTERN...]")
    entries = [p.strip() for p in ips.split(",") if p.strip()]
    try:
        addrs = tuple(ipaddress.ip_address(p) for p in entries if not is_name_like(p))
        patterns = parse_patterns(p for p in entries if is_name_like(p))
        return ServiceSpec(id=name.strip(), virtual_ips=addrs, patterns=patterns)
    except (ValueError, DecodeError) as exc:
        raise UsageError(f"--service {text!r}: {exc}") from exc


def parse_forward(text: str, flag: str = "-L") -> Forward:
    """`[LISTEN_HOST:]LISTEN_PORT=SERVICE:PORT`."""
    left, sep, right = text.partition("=")
    if not sep:
        raise UsageError(f"{flag} {text!r}: expected [HOST:]PORT=SERVICE:PORT")
    if left.isdigit():
        left = f"127.0.0.1:{left}"
    host, port = split_host_port(left)
    target, tport = split_host_port(right)
    try:
        return Forward(listen_host=host, listen_port=port, target=target, target_port=tport)
    except ValueError as exc:
        raise UsageError(f"{flag} {text!r}: {exc}") from exc


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/ztna-agent")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "ztna-agent"
    return Path(f"/tmp/ztna-agent-{os.getuid()}")


class AgentOptions(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    intermediate: tuple[str, int]   # the one attached to (or tried) now: the first at start
    # Every Intermediate given (`--intermediate A,B,…`, members of one cluster), in order of
    # preference; empty means just `intermediate`. The session fails over along it.
    intermediates: tuple[tuple[str, int], ...] = ()
    # Which of several to attach to first: "rtt", the nearest by handshake time (with the
    # list's order among the about as near: ztna.link.targets), or "first", the list's order.
    pick: Literal["rtt", "first"] = "rtt"
    tls: TlsFiles
    server_name: str | None = None  # TLS name to verify; default: the Intermediate's host (IP or DNS)
    services: tuple[ServiceSpec, ...]
    mode: Literal["tun", "userspace"] = "userspace"
    name: str = "ztna0"
    tun_name: str = "ztna0"
    tun_v4: ipaddress.IPv4Address = DEFAULT_TUN_V4
    tun_v6: ipaddress.IPv6Address = DEFAULT_TUN_V6
    forwards: tuple[Forward, ...] = ()
    udp_forwards: tuple[Forward, ...] = ()
    socks: tuple[str, int] | None = None
    state_dir: Path = Field(default_factory=default_state_dir)
    tcp_transport: Literal["datagram", "stream"] = "stream"   # docs/carriage.md: faster, loss-robust
    udp_payload: int = limits.DEFAULT_QUIC_UDP_PAYLOAD
    keepalive: float = 2.0          # QUIC PING when idle this long (also feeds the RTT)
    dead_after: float = 8.0         # nothing heard for this long: the path is dead, reconnect
    cid_rotation: float = limits.CID_ROTATION_INTERVAL   # a fresh connection ID this often
    register_retry: float = 1.0     # first re-send of an unanswered registration
    backoff_initial: float = 0.2
    backoff_cap: float = 10.0
    queue_limit: int = 256          # packets held while (re)connecting
    metrics: tuple[str, int] | None = None   # Prometheus /metrics + /healthz (default off)
    p2p_cooldown: float = 30.0      # after a direct-path failure, before punching again
    dns_listen: ipaddress.IPv4Address = DEFAULT_DNS_V4   # TUN mode, DNS-pattern services
    dns_pools: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.IPv4Network(DEFAULT_POOL_V4), ipaddress.IPv6Network(DEFAULT_POOL_V6))
    dns_ttl: float = Field(default=DEFAULT_DNS_TTL, gt=0, le=86400)
    dns_configure: bool = True      # tell systemd-resolved to route the domains to us

    @model_validator(mode="after")
    def _check(self) -> AgentOptions:
        if not self.services:
            raise ValueError("at least one --service is required")
        ids = [s.id for s in self.services]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate service id")
        seen: set[IpAddress] = set()
        for svc in self.services:
            for ip in svc.virtual_ips:
                if ip in seen:
                    raise ValueError(f"virtual IP {ip} given to two services")
                seen.add(ip)
        owner: dict[DomainPattern, str] = {}
        for svc in self.services:
            for pat in svc.patterns:
                if pat in owner:
                    raise ValueError(f"DNS pattern {pat} given to two services ({owner[pat]}, {svc.id})")
                owner[pat] = svc.id
        if len({n.version for n in self.dns_pools}) != len(self.dns_pools):
            raise ValueError("--dns-pool: at most one IPv4 and one IPv6 prefix")
        for net in self.dns_pools if any(s.patterns for s in self.services) else ():
            if any(ip in net for ip in seen):
                raise ValueError(f"--dns-pool {net} overlaps a virtual IP")
        if len(self.tun_name.encode()) > 15:
            raise ValueError("--tun-name longer than 15 bytes")
        return self

    def targets(self) -> tuple[tuple[str, int], ...]:
        return self.intermediates or (self.intermediate,)

    def tls_name(self) -> str:
        """The name the Intermediate's certificate must hold: an IP SAN when the Agent was
        given an IP, a DNS SAN otherwise (the Connector verifies the same way)."""
        return self.server_name or self.intermediate[0]

    @property
    def named(self) -> bool:
        """True if some service is reached by DNS name."""
        return any(s.patterns for s in self.services)

    def service_for_name(self, name: str) -> tuple[ServiceSpec, str] | None:
        """(service, canonical name) whose patterns cover `name` best, or None."""
        try:
            canonical = normalize_name(name)
        except DecodeError:
            return None
        sid = best_service(canonical, {s.id: s.patterns for s in self.services})
        if sid is None:
            return None
        return next(s for s in self.services if s.id == sid), canonical

    def service_for_target(self, target: str) -> tuple[ServiceSpec, IpAddress]:
        """Resolve `web`, `web.ztna` or a virtual IP literal to (service, virtual IP)."""
        name = target[:-5] if target.endswith(".ztna") else target
        for svc in self.services:
            if svc.id == name and svc.virtual_ips:
                return svc, svc.virtual_ips[0]
        try:
            ip = ipaddress.ip_address(target.strip("[]"))
        except ValueError:
            raise UsageError(f"unknown service {target!r}") from None
        for svc in self.services:
            if ip in svc.virtual_ips:
                return svc, ip
        raise UsageError(f"{target} is not a virtual IP of any service")


class _ServiceTable(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    virtual_ips: list[str] = Field(default_factory=list)
    domains: list[str] = Field(default_factory=list)


class AgentFile(BaseModel):
    """The Agent's TOML file: the same settings as the flags, under the same names
    (`services`, `forwards`, `udp_forwards` for the repeatable ones). Unknown keys are an
    error, so a typo cannot silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")
    intermediate: str | None = None
    pick: Literal["rtt", "first"] | None = None
    pki: str | None = None
    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    server_name: str | None = None
    services: list[str | _ServiceTable] | None = None
    mode: Literal["tun", "userspace"] | None = None
    tun_name: str | None = None
    name: str | None = None
    forwards: list[str] | None = None
    udp_forwards: list[str] | None = None
    socks: str | None = None
    state_dir: str | None = None
    tcp_transport: Literal["datagram", "stream"] | None = None
    p2p_cooldown: float | None = Field(default=None, ge=0.1)
    metrics: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] | None = None
    dns_listen: str | None = None
    dns_pools: list[str] | None = None
    dns_ttl: float | None = Field(default=None, gt=0, le=86400)


# file key -> the click parameter it stands for
_FILE_TO_FLAG = {"services": "service", "forwards": "forward", "udp_forwards": "udp_forward",
                 "dns_pools": "dns_pool"}


def load_agent_file(path: str | Path) -> dict[str, object]:
    """The settings in an Agent TOML file, keyed like the `ztna agent` flags' parameters
    (`service`, `forward`, ... as tuples of their flag spellings). UsageError with one line
    naming the file, the key and the value otherwise."""
    from pydantic import ValidationError

    from ztna.startup import read_toml

    data = {k.replace("-", "_"): v for k, v in read_toml(path).items()}
    try:
        cfg = AgentFile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "config"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not an Agent setting)"
        shown = err.get("input")
        value = "" if isinstance(shown, dict | list) else f" = {shown!r}"
        raise UsageError(f"config file {str(path)!r}: invalid {loc}{value}: {msg}") from None
    out: dict[str, Any] = {}
    for key, item in cfg.model_dump(exclude_none=True).items():
        if key == "services":
            item = tuple(v if isinstance(v, str) else f"{v['id']}={','.join(v['virtual_ips'] + v['domains'])}"
                         for v in item)
        elif isinstance(item, list):
            item = tuple(item)
        out[_FILE_TO_FLAG.get(key, key)] = item
    return out
