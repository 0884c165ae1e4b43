"""The test client behind `ztna client`: one QUIC connection to an Intermediate, scripted.

Theory of operation
-------------------
`run_client(options)` connects (timing the handshake), waits briefly for QAD, registers each
`--service` on the control stream and waits for its ACK/NACK, then sends what it was told:
raw DATAGRAMs (`--send`, `--send-hex`) and/or real IPv4/IPv6 UDP packets wrapped in 0x2F for
the first service (`--send-udp`). It returns ONE result dict (printed as JSON by the CLI).

Echo checking is strict (the original counted QAD and ACK datagrams as echoes): only a
DATAGRAM that parses as an IP packet carrying UDP **from --dst to our inner source** counts,
and its payload must equal, byte for byte, one payload we sent and have not yet matched.
Everything else is counted under `unrelated`.

Sizes: the live DATAGRAM maximum comes from the connection. The Intermediate rewrites our
0x2F header into a 0x30 header that is 5 bytes longer (`to_connector_overhead` −
`service_datagram_overhead`), so the largest 0x2F that can reach a Connector whose
connection has the same maximum is `max_datagram_payload − 5`: that is the "max" of
`--payload-size max` (`tunnel_max` in the result). A datagram above it is refused here,
before sending, with a clear error.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import os
import socket
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ztna import limits
from ztna.errors import DatagramTooLarge, DecodeError, ProtocolError, UsageError, error_text
from ztna.netstack.packets import PROTO_UDP, build_udp_packet, ip_to_bytes, parse_ip, parse_udp
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.quic.maintenance import ConnectionUpkeep
from ztna.wire import (
    ControlMessage,
    GoAway,
    ObservedAddress,
    Register,
    RegistrationAck,
    RegistrationNack,
    Role,
    ServiceStatus,
    decode_qad,
    decode_registration,
    encode_control,
    encode_service_datagram,
    service_datagram_overhead,
    to_connector_overhead,
)

SWEEP_UDP_PAYLOADS = (1200, 1250, 1280, 1300, 1350, 1400, 1452)
DEFAULT_INNER_SRC_V4 = ("10.0.0.100", 12345)
DEFAULT_INNER_SRC_V6 = ("fd00::100", 12345)


@dataclass
class ClientOptions:
    server: tuple[str, int]
    tls: TlsFiles
    server_name: str = "localhost"
    services: list[str] = field(default_factory=list)
    as_connector: bool = False
    raw_sends: list[bytes] = field(default_factory=list)
    send_udp: bytes | None = None
    dst: tuple[str, int] | None = None
    src: tuple[str, int] | None = None
    payload_size: str | None = None          # "N" | "max" | "max-1" | "max+1"
    payload_pattern: str = "seq"
    repeat: int = 1
    burst: int = 1
    delay_ms: float = 0.0
    verify_echo: bool = False
    measure_rtt: bool = False
    rtt_count: int = 10
    alpn: str | None = None
    udp_payload: int = limits.DEFAULT_QUIC_UDP_PAYLOAD
    timeout: float = 5.0
    wait_ms: float = 300.0
    cid_rotation: float | None = None
    hold_s: float = 0.0                      # stay connected this long after sending
    keylog: str | None = None


class _Handler(ConnectionHandler):
    def __init__(self) -> None:
        self.qad: ObservedAddress | None = None
        self.replies: dict[str, RegistrationAck | RegistrationNack] = {}
        self.packets: list[bytes] = []
        self.messages: list[object] = []
        self.unrelated = 0
        self.goaway = False
        self.closed_reason: str | None = None
        self.heard = False          # anything at all arrived from the server
        self._changed: asyncio.Future[None] | None = None

    def _poke(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    async def wait_for(self, predicate: Any, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0 or self.closed_reason is not None:
                return bool(predicate())
            self._changed = loop.create_future()
            try:
                await asyncio.wait_for(self._changed, remaining)
            except TimeoutError:
                return bool(predicate())
        return True

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        self.heard = True
        self._message(msg)
        self._poke()

    def on_control_error(self, conn: ZtnaConnection, error: ProtocolError) -> None:
        self.heard = True
        self.unrelated += 1
        self._poke()

    def _message(self, msg: object) -> None:
        if isinstance(msg, ObservedAddress):
            self.qad = msg
        elif isinstance(msg, RegistrationAck | RegistrationNack):
            self.replies[msg.service_id] = msg
        else:
            if isinstance(msg, GoAway):
                self.goaway = True
            self.messages.append(msg)

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self.heard = True
        first = data[0] if data else 0
        try:
            if first == 0x01:
                self.qad = decode_qad(data)
            elif first in (0x12, 0x13):
                self._message(decode_registration(data))
            elif first >> 4 in (4, 6):
                self.packets.append(bytes(data))
            else:
                self.unrelated += 1
        except DecodeError:
            self.unrelated += 1
        self._poke()

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        self.closed_reason = reason or "closed"
        self._poke()


def make_payload(size: int, pattern: str, seq: int, rng: Any = None) -> bytes:
    """Payload of `size` bytes; `seq` makes consecutive payloads distinct (except zeros)."""
    if pattern == "zeros":
        return bytes(size)
    if pattern == "random":
        return (rng or os.urandom)(size)
    head = seq.to_bytes(4, "big")
    body = bytes((seq + i) & 0xFF for i in range(size))
    return (head + body[4:])[:size] if size >= 4 else body


def _resolve(host: str, port: int, family: int = 0) -> tuple[str, int]:
    infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])


def _stats(samples_ms: list[float]) -> dict[str, float] | None:
    if not samples_ms:
        return None
    s = sorted(samples_ms)

    def pct(p: float) -> float:
        # nearest-rank percentile
        return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]

    return {"count": len(s), "min": s[0], "avg": statistics.fmean(s), "p50": pct(50),
            "p95": pct(95), "max": s[-1]}


class _Echo:
    """Expected echoes: UDP payloads we sent from `inner` to `dst`, matched byte-exact."""

    def __init__(self, inner: tuple[str, int], dst: tuple[str, int]) -> None:
        self.inner_ip = ip_to_bytes(inner[0])
        self.inner_port = inner[1]
        self.dst_ip = ip_to_bytes(dst[0])
        self.dst_port = dst[1]
        self.expected: Counter[bytes] = Counter()
        self.matched = 0
        self.unrelated = 0

    def reply_payload(self, packet: bytes) -> bytes | None:
        try:
            ip = parse_ip(packet)
            if ip.proto != PROTO_UDP:
                return None
            udp = parse_udp(packet, ip)
        except (DecodeError, UsageError):
            return None
        if (bytes(ip.src), udp.sport, bytes(ip.dst), udp.dport) != (
            self.dst_ip, self.dst_port, self.inner_ip, self.inner_port
        ):
            return None
        return bytes(udp.payload)

    def take(self, packets: list[bytes]) -> int:
        """Match the replies in `packets` (emptied); how many matched so far."""
        while packets:
            payload = self.reply_payload(packets.pop(0))
            if payload is not None and self.expected[payload] > 0:
                self.expected[payload] -= 1
                self.matched += 1
            else:
                self.unrelated += 1
        return self.matched


async def run_client(o: ClientOptions) -> dict[str, Any]:
    """Run one scripted session; never raises for peer/network failures (they go in the result)."""
    loop = asyncio.get_running_loop()
    result: dict[str, Any] = {
        "ok": False, "connected": False, "server": f"{o.server[0]}:{o.server[1]}",
        "handshake_ms": None, "qad": None, "registrations": {}, "max_datagram_payload": None,
        "tunnel_max": None, "udp_payload": o.udp_payload, "sent": 0, "echoed": 0,
        "echo_ok": None, "rtt_ms": None, "unrelated": 0, "messages": [], "errors": [],
        "refused_locally": None, "closed": None, "close_reason": None, "goaway": False,
        "cid_rotations": 0,
    }
    errors: list[str] = result["errors"]
    try:
        addr = _resolve(*o.server)
    except OSError as exc:
        errors.append(f"resolve {o.server[0]}: {exc}")
        return result
    config = make_configuration(is_client=True, tls=o.tls, server_name=o.server_name,
                                udp_payload=o.udp_payload, keylog_path=o.keylog)
    if o.alpn is not None:
        config.alpn_protocols = [o.alpn]
    ep = QuicEndpoint(bind_udp("::" if ":" in addr[0] else "0.0.0.0", 0))
    handler = _Handler()
    upkeep: ConnectionUpkeep | None = None
    try:
        start = loop.time()
        conn = ep.connect(addr, config, handler)
        try:
            await asyncio.wait_for(conn.wait_handshake(), o.timeout)
        except (TimeoutError, ConnectionError) as exc:
            errors.append(f"handshake failed: {error_text(exc)}")
            result["close_reason"] = handler.closed_reason
            return result
        result["handshake_ms"] = round((loop.time() - start) * 1000, 3)
        # Our handshake completes before the server has checked our certificate (it comes in
        # our last flight), so a refusal arrives as a close right after it. Connected means
        # the server spoke to us (QAD first) or at least did not close on us meanwhile.
        await handler.wait_for(lambda: handler.qad is not None or handler.heard,
                               min(1.0, o.timeout))
        if handler.closed_reason is not None and not handler.heard:
            errors.append(f"connection closed by server: {handler.closed_reason}")
            result["close_reason"] = handler.closed_reason
            return result
        result["connected"] = True
        result["max_datagram_payload"] = conn.max_datagram_payload()
        if o.cid_rotation:
            upkeep = ConnectionUpkeep(conn, keepalive=None, cid_rotation=o.cid_rotation).start()
        await handler.wait_for(lambda: handler.qad is not None, min(1.0, o.timeout))
        if handler.qad is not None:
            result["qad"] = {"ip": handler.qad.ip, "port": handler.qad.port}
        role = Role.CONNECTOR if o.as_connector else Role.AGENT
        for service in o.services:
            conn.send_control(encode_control(Register(role=role, service_id=service)))
        if o.services:
            await handler.wait_for(lambda: all(s in handler.replies for s in o.services), o.timeout)
        regs_ok = True
        for service in o.services:
            reply = handler.replies.get(service)
            if isinstance(reply, RegistrationAck):
                result["registrations"][service] = "ack"
            else:
                regs_ok = False
                result["registrations"][service] = (
                    f"nack:{reply.status.name}" if isinstance(reply, RegistrationNack) else "timeout"
                )
        if handler.closed_reason is not None:
            errors.append(f"connection closed by server: {handler.closed_reason}")
            return result
        if not regs_ok:
            errors.append("registration refused")
        live_max = conn.max_datagram_payload()
        result["max_datagram_payload"] = live_max
        first = o.services[0] if o.services else None
        if first is not None:
            result["tunnel_max"] = live_max - (to_connector_overhead(first) - service_datagram_overhead(first))
        sent_ok = await _send_all(o, conn, handler, result, first)
        if sent_ok and o.hold_s > 0:
            await asyncio.sleep(o.hold_s)
        if upkeep is not None:
            result["cid_rotations"] = upkeep.rotations
        if handler.closed_reason is not None and not handler.goaway:
            errors.append(f"connection closed by server: {handler.closed_reason}")
        result["ok"] = sent_ok and regs_ok and not errors
        return result
    finally:
        if upkeep is not None:
            upkeep.stop()
        result["unrelated"] += handler.unrelated
        result["goaway"] = handler.goaway
        result["closed"] = handler.closed_reason
        if handler.closed_reason is not None and not handler.goaway:
            result["close_reason"] = handler.closed_reason
        result["messages"] = [_describe(m) for m in handler.messages]
        for conn in list(ep.connections):
            conn.close(0, "client done")
        ep._flush()
        await asyncio.sleep(0.02)
        ep.shutdown_socket()


def _describe(msg: object) -> dict[str, Any]:
    if isinstance(msg, ServiceStatus):
        return {"type": "ServiceStatus", "service": msg.service, "up": msg.up}
    out: dict[str, Any] = {"type": type(msg).__name__}
    for name in getattr(msg, "__slots__", ()):
        value = getattr(msg, name, None)
        if isinstance(value, str | int | bool | float) or value is None:
            out[name] = value
    return out


def _udp_payload_size(o: ClientOptions, tunnel_max: int, service: str, inner_v6: bool) -> int:
    spec = o.payload_size
    assert spec is not None
    if spec.isdigit():
        return int(spec)
    overhead = service_datagram_overhead(service) + (40 if inner_v6 else 20) + 8
    base = tunnel_max - overhead
    return base + {"max": 0, "max-1": -1, "max+1": 1}[spec]


async def _send_all(o: ClientOptions, conn: ZtnaConnection, handler: _Handler,
                    result: dict[str, Any], service: str | None) -> bool:
    loop = asyncio.get_running_loop()
    errors: list[str] = result["errors"]
    for data in o.raw_sends:
        try:
            conn.send_datagram(data)
            result["sent"] += 1
        except DatagramTooLarge as exc:
            result["refused_locally"] = str(exc)
            errors.append(f"refused locally: {exc}")
            return False
    wants_udp = o.send_udp is not None or o.payload_size is not None or o.measure_rtt
    if not wants_udp:
        if o.raw_sends:
            await asyncio.sleep(o.wait_ms / 1000)
            result["unrelated"] += len(handler.packets)
            handler.packets.clear()
        return True
    if service is None or o.dst is None:
        errors.append("--send-udp/--payload-size/--measure-rtt need --service and --dst")
        return False
    dst = o.dst
    inner_v6 = ":" in dst[0]
    inner = o.src or (DEFAULT_INNER_SRC_V6 if inner_v6 else DEFAULT_INNER_SRC_V4)
    if (":" in inner[0]) != inner_v6:
        errors.append("--src and --dst must be the same IP version")
        return False
    tunnel_max = result["tunnel_max"]
    src_b, dst_b = ip_to_bytes(inner[0]), ip_to_bytes(dst[0])
    echo = _Echo(inner, dst)

    def datagram(payload: bytes) -> bytes:
        return encode_service_datagram(service, build_udp_packet(src_b, dst_b, inner[1], dst[1], payload))

    seq = 0
    udp_sent = 0
    if o.send_udp is not None or o.payload_size is not None:
        size = _udp_payload_size(o, tunnel_max, service, inner_v6) if o.payload_size else None
        if size is not None and size < 0:
            errors.append(f"--payload-size {o.payload_size}: negative size {size}")
            return False
        for round_no in range(o.repeat):
            if round_no and o.delay_ms:
                await asyncio.sleep(o.delay_ms / 1000)
            for _ in range(o.burst):
                payload = make_payload(size, o.payload_pattern, seq) if size is not None else o.send_udp
                assert payload is not None
                seq += 1
                dgram = datagram(payload)
                if len(dgram) > tunnel_max:
                    result["refused_locally"] = (
                        f"0x2F datagram of {len(dgram)} bytes exceeds the tunnel maximum of {tunnel_max} "
                        f"(live DATAGRAM max {result['max_datagram_payload']} minus the 5 bytes the relay adds)"
                    )
                    errors.append(f"refused locally: {result['refused_locally']}")
                    return False
                try:
                    conn.send_datagram(dgram)
                except DatagramTooLarge as exc:
                    result["refused_locally"] = str(exc)
                    errors.append(f"refused locally: {exc}")
                    return False
                echo.expected[payload] += 1
                result["sent"] += 1
                udp_sent += 1
                result["udp_payload_bytes"] = len(payload)
                result["datagram_bytes"] = len(dgram)
        if o.verify_echo:
            total = udp_sent
            await handler.wait_for(lambda: echo.take(handler.packets) >= total, o.timeout)
            echo.take(handler.packets)
            result["echoed"] = echo.matched
            result["echo_ok"] = echo.matched == total
            if not result["echo_ok"]:
                errors.append(f"echo: {echo.matched}/{total} byte-exact replies")
        else:
            await asyncio.sleep(o.wait_ms / 1000)
            echo.take(handler.packets)
            result["echoed"] = echo.matched
    if o.measure_rtt:
        samples: list[float] = []
        timeouts = 0
        for i in range(o.rtt_count):
            payload = b"rtt-%d-" % i + os.urandom(8)
            echo.expected[payload] += 1
            before = echo.matched
            start = loop.time()
            conn.send_datagram(datagram(payload))
            got = await handler.wait_for(lambda: echo.take(handler.packets) > before, 1.0)  # noqa: B023 - awaited within this iteration
            if got:
                samples.append((loop.time() - start) * 1000)
            else:
                timeouts += 1
                echo.expected[payload] -= 1
            await asyncio.sleep(0.01)
        stats = _stats(samples)
        result["rtt_ms"] = {**(stats or {}), "timeouts": timeouts}
        if timeouts:
            errors.append(f"rtt: {timeouts}/{o.rtt_count} echoes timed out")
    result["unrelated"] += echo.unrelated
    return not errors


async def run_query_sweep(base: ClientOptions, payloads: tuple[int, ...] = SWEEP_UDP_PAYLOADS) -> list[dict[str, Any]]:
    """Connect once per (address family where the server resolves) × UDP payload size."""
    rows: list[dict[str, Any]] = []
    host, port = base.server
    targets: list[tuple[str, str]] = []
    for family, name in ((socket.AF_INET, "ipv4"), (socket.AF_INET6, "ipv6")):
        try:
            ip, _ = _resolve(host, port, family)
        except OSError:
            if host != "localhost":
                continue
            # /etc/hosts often maps localhost to 127.0.0.1 only; loopback exists in both.
            ip = "127.0.0.1" if family == socket.AF_INET else "::1"
        targets.append((name, ip))
    for name, ip in targets:
        for size in payloads:
            opts = ClientOptions(server=(ip, port), tls=base.tls, server_name=base.server_name,
                                 udp_payload=size, timeout=base.timeout, alpn=base.alpn)
            res = await run_client(opts)
            rows.append({
                "family": name, "server": ip, "udp_payload": size,
                "max_datagram_payload": res["max_datagram_payload"] if res["connected"] else None,
                "qad": res["qad"], "error": "; ".join(res["errors"]) or None,
            })
    return rows


def parse_ip_port(text: str) -> tuple[str, int]:
    """`IP:PORT` or `[IPv6]:PORT` with a literal IP (inner packet addresses)."""
    from ztna.intermediate.config import parse_host_port

    try:
        host, port = parse_host_port(text)
        ipaddress.ip_address(host)
    except ValueError as exc:
        raise UsageError(f"bad IP:PORT {text!r}: {exc}") from None
    return host, port
