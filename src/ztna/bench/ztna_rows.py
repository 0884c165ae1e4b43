"""The ztna rows: Intermediate on ``relay``, Connector on ``conn``, Agent (TUN) on ``agent``.

Each row builds the whole ztna stack from scratch (fresh PKI per run, fresh processes
per row) so one row's state cannot help or hurt the other:

* ``ztna-direct``: nothing blocked; the row waits until the Agent's status socket
  reports a non-relay path for the service (that wait is the warm-up "time to
  direct"). If the build has no P2P or the path never turns direct, the row says so
  and measures nothing: relay numbers must not be shown as direct ones.
* ``ztna-relay``: the direct path is blocked at NAT B (and the Agent's own P2P switch
  is turned off when the build has one), so every byte crosses the Intermediate.

Numbers come from the same ``measure`` as every peer, towards the service's virtual IP
``10.100.0.20`` (tcp 5201 -> app:5201, tcp 7000 -> app:7000, udp 7 -> app:7; the Connector's
health check connects to port 7000 only, never to the one-test iperf3 servers). NAT A's
conntrack audit then shows where the bytes really went.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any, Final

from ztna.bench.harness import BenchContext, Row, RowError, RowScope, wait_echo
from ztna.bench.lanops import RELAY_PUB, block_direct

VIP: Final = "10.100.0.20"
SERVICE: Final = "app"
# The health check connects to the TCP echo server only. The default (a connect check per
# TCP backend, every 2 s) also connected to iperf3's port, and each iperf3 server runs for
# exactly one test (`-s -1`): a probe that landed between the server's start and the
# client's connect was that one test, the server exited, and the client's connection was
# refused and reset ("unable to receive control message: Connection reset by peer").
CONNECTOR_SERVICE: Final = (f"{SERVICE}={VIP};tcp:5201=10.2.0.20:5201;"
                            "tcp:7000=10.2.0.20:7000;udp:7=10.2.0.20:7;check=tcp:7000")


def _ztna(*args: str) -> list[str]:
    return [sys.executable, "-m", "ztna", *args]


def agent_help() -> str:
    try:
        out = subprocess.run(_ztna("agent", "--help"), capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout


def no_p2p_flag(help_text: str) -> list[str] | None:
    """The Agent's switch to turn P2P off, if this build has one."""
    if "--no-p2p" in help_text:
        return ["--no-p2p"]
    if "--p2p [" in help_text or "--p2p TEXT" in help_text or "--p2p " in help_text:
        return ["--p2p", "off"]
    return None


def make_pki(workdir: str) -> str:
    from ztna.certs import init_pki

    pki = os.path.join(workdir, "pki")
    if not os.path.exists(os.path.join(pki, "ca.pem")):
        init_pki(pki, [SERVICE], ["localhost", RELAY_PUB], days=2)
    return pki


def _status(state_dir: str, name: str) -> dict[str, Any] | None:
    from ztna.agent.control import query

    try:
        snap: dict[str, Any] = query(os.path.join(state_dir, f"{name}.sock"))
        return snap
    except (OSError, ValueError):
        return None


def _service_path(snap: dict[str, Any] | None) -> str | None:
    if not snap:
        return None
    for s in snap.get("services", []):
        if s.get("id") == SERVICE:
            return s.get("path")
    return None


def start_stack(ctx: BenchContext, scope: RowScope, *, p2p: bool) -> dict[str, Any]:
    """Intermediate + Connector + Agent; returns timings and the Agent's state dir."""
    lab = ctx.lab
    pki = make_pki(ctx.workdir)
    info: dict[str, Any] = {}
    inter = scope.spawn("relay", _ztna("intermediate", "--listen", "0.0.0.0:4433", "--pki", pki,
                                       "--metrics", "off"), "intermediate")
    scope.wait_for("intermediate listening", lambda: _udp_listening(lab, "relay", 4433), 20,
                   inter, "intermediate")
    conn_args = ["connector", "--intermediate", f"{RELAY_PUB}:4433", "--server-name",
                 "localhost", "--pki", pki, "--service", CONNECTOR_SERVICE, "--metrics", "off"]
    if not p2p:
        conn_args += ["--p2p-port", "off"]
    scope.spawn("conn", _ztna(*conn_args), "connector")
    time.sleep(1.0)  # let the Connector register before the Agent asks for the service
    state_dir = os.path.join(scope.workdir, "agent-state")
    name = f"{lab.config.prefix}bench"
    agent_args = ["agent", "--intermediate", f"{RELAY_PUB}:4433", "--server-name", "localhost",
                  "--pki", pki, "--service", f"{SERVICE}={VIP}", "--mode", "tun",
                  "--tun-name", f"{lab.config.prefix}zt0", "--name", name,
                  "--state-dir", state_dir]
    if not p2p:
        agent_args += no_p2p_flag(agent_help()) or []
    t0 = time.monotonic()
    agent = scope.spawn("agent", _ztna(*agent_args), "agent")
    try:
        wait_echo(lab, "agent", VIP, 7, None, 30)
    except RowError as exc:
        for proc, log in ((agent, "agent"), (inter, "intermediate")):
            if proc.poll() is not None:
                raise RowError(f"{log} exited: {scope.log_tail(log)}") from exc
        raise RowError(f"{exc}; connector: {scope.log_tail('connector', 300)}; "
                       f"agent: {scope.log_tail('agent', 300)}") from exc
    info["first_echo_s"] = round(time.monotonic() - t0, 3)
    info["state_dir"], info["name"], info["t0"] = state_dir, name, t0
    snap = _status(state_dir, name)
    info["path_at_first_echo"] = _service_path(snap)
    if snap:
        info["max_datagram_payload"] = snap.get("intermediate", {}).get("max_datagram_payload")
        info["tun_mtu"] = snap.get("tun", {}).get("mtu")
    return info


def _udp_listening(lab: Any, node: str, port: int) -> bool:
    out = lab.run(node, ["ss", "-Huln", f"sport = :{port}"], check=False)
    return bool(out.stdout.strip())


def run_ztna(ctx: BenchContext, row: Row, *, direct: bool, p2p_timeout: float = 20.0) -> None:
    with ctx.scope(row.key) as scope:
        t0 = time.monotonic()
        if not direct:
            block_direct(scope)
            if no_p2p_flag(agent_help()) is None:
                row.extra["p2p_switch"] = "none in this build; direct path blocked at NAT B"
        info = start_stack(ctx, scope, p2p=direct)
        row.extra["warmup"] = {k: v for k, v in info.items() if k not in ("state_dir", "t0")}
        if direct:
            path = info["path_at_first_echo"]
            deadline = time.monotonic() + p2p_timeout
            while path in (None, "relay") and time.monotonic() < deadline:
                time.sleep(0.2)
                path = _service_path(_status(info["state_dir"], info["name"]))
            if path in (None, "relay"):
                row.status = "failed"
                row.note = (f"the Agent never reported a direct path within {p2p_timeout:.0f} s "
                            f"(path={path}); not measured, relay numbers are in the relay row")
                return
            row.extra["warmup"]["time_to_direct_s"] = round(time.monotonic() - info["t0"], 3)
            row.extra["warmup"]["path"] = path
            snap = _status(info["state_dir"], info["name"]) or {}
            # the Agent's own figure: punch start -> first byte on the direct path
            row.extra["warmup"]["agent_warmup_ms"] = snap.get("warmup_ms")
            row.extra["agent_p2p"] = snap.get("p2p")
        row.setup_s = round(time.monotonic() - t0, 3)
        ctx.measure(scope, row, target=VIP, udp=True)
        seen = row.extra.get("path_seen")
        want = "direct" if direct else "relay"
        if seen is not None and seen != want:
            row.note = "; ".join(filter(None, [row.note, f"underlay path was {seen}, not {want}"]))
