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
from ztna.errors import UsageError
from ztna.quic.config import TlsFiles
from ztna.wire.service_id import validate_service_id

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Addresses the Agent gives itself: the TUN's own address (source of routed packets) and the
# synthetic source of userspace UDP packets. Shared address space (RFC 6598) / ULA.
DEFAULT_TUN_V4 = ipaddress.IPv4Address("100.64.0.1")
DEFAULT_TUN_V6 = ipaddress.IPv6Address("fd00:64::1")


class ServiceSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    virtual_ips: tuple[IpAddress, ...]

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        validate_service_id(value)
        return value

    @field_validator("virtual_ips")
    @classmethod
    def _ips(cls, value: tuple[IpAddress, ...]) -> tuple[IpAddress, ...]:
        if not value:
            raise ValueError("a service needs at least one virtual IP")
        return value


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
    """`web=10.100.0.2,fd00:100::2`."""
    name, sep, ips = text.partition("=")
    if not sep or not ips:
        raise UsageError(f"--service {text!r}: expected ID=IP[,IP...]")
    try:
        addrs = tuple(ipaddress.ip_address(p.strip()) for p in ips.split(",") if p.strip())
        return ServiceSpec(id=name.strip(), virtual_ips=addrs)
    except ValueError as exc:
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

    intermediate: tuple[str, int]
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
        if len(self.tun_name.encode()) > 15:
            raise ValueError("--tun-name longer than 15 bytes")
        return self

    def tls_name(self) -> str:
        """The name the Intermediate's certificate must hold: an IP SAN when the Agent was
        given an IP, a DNS SAN otherwise (the Connector verifies the same way)."""
        return self.server_name or self.intermediate[0]

    def service_for_target(self, target: str) -> tuple[ServiceSpec, IpAddress]:
        """Resolve `web`, `web.ztna` or a virtual IP literal to (service, virtual IP)."""
        name = target[:-5] if target.endswith(".ztna") else target
        for svc in self.services:
            if svc.id == name:
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
    virtual_ips: list[str] = Field(min_length=1)


class AgentFile(BaseModel):
    """The Agent's TOML file: the same settings as the flags, under the same names
    (`services`, `forwards`, `udp_forwards` for the repeatable ones). Unknown keys are an
    error, so a typo cannot silently fall back to a default."""

    model_config = ConfigDict(extra="forbid")
    intermediate: str | None = None
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


# file key -> the click parameter it stands for
_FILE_TO_FLAG = {"services": "service", "forwards": "forward", "udp_forwards": "udp_forward"}


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
            item = tuple(v if isinstance(v, str) else f"{v['id']}={','.join(v['virtual_ips'])}"
                         for v in item)
        elif isinstance(item, list):
            item = tuple(item)
        out[_FILE_TO_FLAG.get(key, key)] = item
    return out
