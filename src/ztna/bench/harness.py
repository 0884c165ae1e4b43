"""Shared machinery of ``ztna bench``: row results, per-row scopes and the measurements.

Every benchmark row runs inside a ``RowScope``: each process it starts goes through
``scope.spawn`` (``Lab.spawn``, so the lab's teardown would also find it) and each
change it makes to the lab (nft tables, addresses) registers an undo callback. Leaving
the scope (normally, on error or on a timeout) stops the processes with SIGTERM then
SIGKILL and runs the undos in reverse, each guarded, so one broken row never leaks into
the next. A row never raises out of the runner: its ``status``/``note`` carry the reason.

Measurements, all from the Agent node towards the app (10.2.0.20) or its virtual IP:

* ``iperf3`` (server spawned on the app node for exactly one test with ``-1``; client
  on the agent with ``-J``) gives Mbit/s received and the sender's retransmits;
  ``-R`` measures the download direction (app -> agent).
* ``ztna.bench.echo`` clients give TCP request/response p50/p95 over one connection,
  per-connection set-up + one round trip, and a UDP echo (ping-like) p50/p95.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from ztna import procs
from ztna.lab import Lab

log = logging.getLogger("ztna.bench")

APP_IPERF_PORT: Final = 5201
APP_TCP_ECHO: Final = 7000
APP_UDP_ECHO: Final = 7
APT_LINE: Final = ("apt-get install -y --no-install-recommends nebula wireguard-tools "
                   "wireguard-go sshuttle openssh-server iperf3")


@dataclass(slots=True)
class Row:
    """One benchmark path. Numbers stay None when not measured (never invented)."""

    key: str  # e.g. "ztna-direct"
    label: str
    kind: str  # "ztna" | "peer" | "baseline"
    status: str = "pending"  # "ok" | "partial" | "failed" | "missing" | "skipped"
    note: str = ""
    target: str = ""
    tcp_up_mbps: float | None = None
    tcp_down_mbps: float | None = None
    tcp_up_retrans: int | None = None
    tcp_down_retrans: int | None = None
    tcp_rtt_p50_ms: float | None = None
    tcp_rtt_p95_ms: float | None = None
    connect_p50_ms: float | None = None
    udp_rtt_p50_ms: float | None = None
    udp_rtt_p95_ms: float | None = None
    udp_lost: int | None = None
    setup_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class BenchContext:
    """What every row needs: the lab, where to write, and how long to measure."""

    lab: Lab
    workdir: str
    seconds: float
    count: int
    connects: int
    directions: tuple[str, ...]
    audit: Any = None  # lanops.PathAudit

    def scope(self, name: str) -> RowScope:
        return RowScope(self.lab, self.workdir, name)

    def measure(self, scope: RowScope, row: Row, **kw: Any) -> None:
        audit = self.audit if kw.pop("audit", True) else None
        if audit is not None:
            audit.reset()
        measure(scope, row, seconds=self.seconds, count=self.count, connects=self.connects,
                directions=self.directions, **kw)
        if audit is not None:
            counts = audit.read()
            row.extra["underlay_bytes"] = counts
            row.extra["path_seen"] = path_seen(counts)


def path_seen(counts: dict[str, int]) -> str | None:
    """"direct" / "relay" when one carries at least 90 % of the bytes, else "mixed"."""
    total = counts.get("direct", 0) + counts.get("relay", 0)
    if total < 100_000:
        return None
    for which in ("direct", "relay"):
        if counts.get(which, 0) >= 0.9 * total:
            return which
    return "mixed"


class RowError(Exception):
    """A row could not be set up or measured; the message goes into the table."""


def missing_tools(*tools: str) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def tool_version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0].strip() if text else None


class RowScope:
    """Processes and lab changes of one row; undone on exit, whatever happened."""

    def __init__(self, lab: Lab, workdir: str, name: str) -> None:
        self.lab = lab
        self.workdir = os.path.join(workdir, name)
        os.makedirs(self.workdir, exist_ok=True)
        self._procs: list[subprocess.Popen[Any]] = []
        self._undo: list[tuple[str, Callable[[], Any]]] = []

    def __enter__(self) -> RowScope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def spawn(self, node: str, argv: list[str], logname: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node`` with stdout+stderr to ``<workdir>/<logname>.log``."""
        proc = procs.spawn(argv, log=os.path.join(self.workdir, f"{logname}.log"), append=True,
                           popen=functools.partial(self.lab.spawn, node), **kw)
        self._procs.append(proc)
        return proc

    def log_tail(self, logname: str, n: int = 400) -> str:
        return procs.tail(os.path.join(self.workdir, f"{logname}.log"), chars=n)

    def on_close(self, what: str, fn: Callable[[], Any]) -> None:
        self._undo.append((what, fn))

    def stop(self, proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
        if procs.stop(proc, grace=grace) is None:
            log.warning("pid %d did not die", proc.pid)

    def close(self) -> None:
        for proc in reversed(self._procs):
            self.stop(proc)
        self._procs.clear()
        for what, fn in reversed(self._undo):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - undo must go on
                log.warning("undo %s failed: %s", what, exc)
        self._undo.clear()

    # ------------------------------------------------------------------ helpers
    def nft(self, node: str, ruleset: str, table: str) -> None:
        """Load ``ruleset`` (which defines ``table``) in ``node``; deleted on close."""
        self.lab.run(node, ["nft", "-f", "-"], input=ruleset)
        self.on_close(f"nft {table} on {node}",
                      lambda: self.lab.run(node, ["nft", "delete", "table", *table.split()],
                                           check=False))

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float,
                 proc: subprocess.Popen[Any] | None = None, logname: str = "") -> None:
        procs.wait_until(lambda: check() or None, timeout=timeout, what=what, interval=0.2,
                         watch=[proc] if proc is not None else [], error=RowError,
                         detail=(lambda: self.log_tail(logname)) if logname else None)


# ---------------------------------------------------------------------- measurements
def _echo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "ztna.bench.echo", *args]


def echo_json(lab: Lab, node: str, args: list[str], timeout: float) -> dict[str, Any]:
    try:
        out = lab.run(node, _echo_argv(*args), check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RowError(f"echo {args[0]} timed out after {timeout:.0f} s") from None
    try:
        data: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RowError(f"echo {args[0]}: no result ({out.stderr.strip()[-300:]})") from None
    if "error" in data:
        raise RowError(f"echo {args[0]} {args[1]}:{args[2]}: {data['error']}")
    return data


def wait_echo(lab: Lab, node: str, host: str, udp_port: int | None, tcp_port: int | None,
              timeout: float) -> float:
    """Seconds until the echo answers through the path (UDP when given, else TCP)."""
    if udp_port is not None:
        args = ["wait-udp", host, str(udp_port), "--timeout", str(timeout)]
    else:
        args = ["wait-tcp", host, str(tcp_port), "--timeout", str(timeout)]
    return float(echo_json(lab, node, args, timeout + 10)["ready_s"])


def iperf3(scope: RowScope, server_node: str, client_node: str, target: str, port: int,
           seconds: float, reverse: bool, server_port: int | None = None) -> tuple[float, int]:
    """One iperf3 TCP test; returns (Mbit/s received, sender retransmits)."""
    sport = server_port or port
    name = f"iperf3-{'down' if reverse else 'up'}"
    srv = scope.spawn(server_node, ["iperf3", "-s", "-1", "-p", str(sport)], name + "-server")
    try:
        time.sleep(0.3)
        argv = ["iperf3", "-c", target, "-p", str(port), "-t", str(seconds), "-J",
                "--connect-timeout", "5000"] + (["-R"] if reverse else [])
        last = ""
        # The server may still be binding: under load that takes longer than the sleep
        # above, and a one-off (-1) server cannot be probed without spending its test.
        for _ in range(10):
            try:
                out = scope.lab.run(client_node, argv, check=False, timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                raise RowError(f"iperf3 {'-R ' if reverse else ''}timed out") from None
            try:
                data = json.loads(out.stdout)
            except json.JSONDecodeError:
                data = {"error": (out.stderr or out.stdout).strip()[-300:]}
            if "error" not in data:
                end = data["end"]
                recv = end.get("sum_received") or end.get("sum")
                sent = end.get("sum_sent") or {}
                return recv["bits_per_second"] / 1e6, int(sent.get("retransmits", 0) or 0)
            last = str(data["error"])
            if "refused" not in last:
                break
            time.sleep(0.5)
        raise RowError(f"iperf3: {last}")
    finally:
        scope.stop(srv, grace=1.0)


def measure(scope: RowScope, row: Row, *, target: str, seconds: float, count: int,
            connects: int, udp: bool, directions: tuple[str, ...],
            iperf_port: int = APP_IPERF_PORT, tcp_echo: int = APP_TCP_ECHO,
            udp_echo: int = APP_UDP_ECHO, client: str = "agent", server: str = "app",
            iperf_server_port: int | None = None) -> None:
    """Fill ``row`` with every measurement; each one failing alone is noted, not fatal."""
    lab = scope.lab
    row.target = target
    for direction in directions:
        try:
            mbps, retrans = iperf3(scope, server, client, target, iperf_port, seconds,
                                   direction == "down", iperf_server_port)
            setattr(row, f"tcp_{direction}_mbps", round(mbps, 1))
            setattr(row, f"tcp_{direction}_retrans", retrans)
        except RowError as exc:
            row.errors.append(f"tcp {direction}: {exc}")
    try:
        res = echo_json(lab, client, ["tcp", target, str(tcp_echo), "--count", str(count),
                                      "--connects", str(connects)], timeout=60 + count * 0.1)
        row.tcp_rtt_p50_ms = res["rtt"]["p50_ms"]
        row.tcp_rtt_p95_ms = res["rtt"]["p95_ms"]
        row.connect_p50_ms = res["connect_rtt"]["p50_ms"]
        row.extra["tcp_echo"] = res
    except RowError as exc:
        row.errors.append(f"tcp echo: {exc}")
    if udp:
        try:
            res = echo_json(lab, client, ["udp", target, str(udp_echo), "--count", str(count)],
                            timeout=60 + count * 1.0)
            row.udp_rtt_p50_ms = res["rtt"]["p50_ms"]
            row.udp_rtt_p95_ms = res["rtt"]["p95_ms"]
            row.udp_lost = res["lost"]
            row.extra["udp_echo"] = res
        except RowError as exc:
            row.errors.append(f"udp echo: {exc}")
    measured = [row.tcp_up_mbps, row.tcp_down_mbps, row.tcp_rtt_p50_ms, row.udp_rtt_p50_ms]
    if row.errors:
        row.status = "partial" if any(v is not None for v in measured) else "failed"
        row.note = "; ".join(filter(None, [row.note, *row.errors]))
    else:
        row.status = "ok"
