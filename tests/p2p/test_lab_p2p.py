"""Lab tests (root): the direct path through real NATs in network namespaces, with TCP.

A TUN-mode Agent in the agent namespace downloads a random file from `python -m http.server`
on the app host through the tunnel (curl, sha256 compared). The TCP connection lives in the
Connector's flow table keyed by (agent id, inner 5-tuple), so it must survive the Agent moving
the service relay → direct (the download starts before the punch is over) and direct → relay
(the Connector's P2P port is blocked mid-transfer). The world (Intermediate, Connector with
`web` tcp:80 → app:8080, TUN Agent) comes from ztna.worlds.lab_tun.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ztna.worlds.lab_tun import PY, VIP4, VIP6, World, make_files

pytestmark = pytest.mark.root

SIZE = 20 * 1024 * 1024
COOLDOWN = 3.0       # short --p2p-cooldown so "unblocked → direct again" fits the test


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("www")
    return d, make_files(d, {"big.bin": SIZE})["big.bin"]


def start(lab: Any, tmp: Path, www: Path) -> World:
    world = World(lab, tmp)
    world.start_infra(www)
    world.agent_runs += 1
    world.agent = world.spawn("agent", [
        PY, "-m", "ztna", "agent", "--intermediate", world.inter, "--server-name", "ztna-intermediate",
        "--pki", str(world.pki), "--service", f"web={','.join(world.vips)}", "--mode", "tun",
        "--name", "lab", "--tun-name", "ztna0", "--state-dir", str(world.state),
        "--p2p-cooldown", str(COOLDOWN)], f"agent-{world.agent_runs}-datagram")
    return world


def p2p(world: World) -> dict[str, Any]:
    snap = world.status() or {}
    return ((snap.get("p2p") or {}).get("services") or {}).get("web") or {}


def wait_p2p(world: World, want: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert world.agent is not None and world.agent.poll() is None, world.agent_log()[-2000:]
        info = p2p(world)
        if info.get("path") == want and (want != "direct" or info.get("warmup_ms") is not None):
            return info
        time.sleep(0.1)
    raise AssertionError(f"path never became {want}: {info}")


class Download(threading.Thread):
    """curl in the agent namespace, in the background (so the path can change under it)."""

    def __init__(self, world: World, url: str, rate: str | None = None) -> None:
        super().__init__(daemon=True)
        self.world, self.url = world, url
        self.extra = ("--limit-rate", rate) if rate else ()
        self.result: dict[str, Any] = {}

    def run(self) -> None:
        self.result = self.world.curl(self.url, max_time=90, extra=self.extra)

    def finish(self) -> dict[str, Any]:
        self.join(120)
        return self.result


def url(world: World) -> str:
    return f"http://[{VIP6}]/big.bin" if world.v6 else f"http://{VIP4}/big.bin"


@pytest.mark.parametrize("ip", ["4", "dual", "6only"])
def test_cone_cone_tcp_survives_the_switch_to_direct(lab_factory: Any, tmp_path: Path,
                                                     www: tuple[Path, str], ip: str) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip=ip, delay_ms=10)
    world = start(lab, tmp_path, www[0])
    try:
        world.wait(None)
        # Started on the relay (the punch takes a few RTTs), finished direct: one TCP
        # connection across the switch.
        first = Download(world, url(world), rate="4M")
        first.start()
        info = wait_p2p(world, "direct")
        r = first.finish()
        assert r["rc"] == 0 and r["sha256"] == www[1], r
        assert info["switches_to_direct"] == 1 and info["direct_failures"] == 0
        # A whole download on the direct path.
        r = world.curl(url(world), max_time=90)
        assert r["rc"] == 0 and r["sha256"] == www[1], r
        info = p2p(world)
        assert info["path"] == "direct" and info["punch"]["state"] == "nominated"
        assert info["switches_to_direct"] == 1
    finally:
        world.close()


@pytest.mark.parametrize("nats", [("cone", "symmetric"), ("symmetric", "symmetric")])
def test_symmetric_stays_on_relay(lab_factory: Any, tmp_path: Path, www: tuple[Path, str],
                                  nats: tuple[str, str]) -> None:
    lab = lab_factory(nat_a=nats[0], nat_b=nats[1], ip="4")
    world = start(lab, tmp_path, www[0])
    try:
        world.wait("relay")
        r = world.curl(url(world), max_time=90)
        assert r["rc"] == 0 and r["sha256"] == www[1], r
        info = wait_p2p(world, "relay")
        deadline = time.monotonic() + 15
        while info.get("punch_failures", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
            info = p2p(world)
        assert info["path"] == "relay" and info["punch_failures"] >= 1
        # with the short cooldown it may already be trying again
        assert info["path_state"] in ("cooldown", "punching") and info["switches_to_direct"] == 0
        assert world.agent is not None and world.agent.poll() is None
    finally:
        world.close()


def test_block_direct_mid_transfer_falls_back_and_returns(lab_factory: Any, tmp_path: Path,
                                                          www: tuple[Path, str]) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip="4", delay_ms=5)
    world = start(lab, tmp_path, www[0])
    try:
        wait_p2p(world, "direct")
        dl = Download(world, url(world), rate="4M")     # ~5 s: long enough to cut under it
        dl.start()
        time.sleep(1.5)
        lab.block_udp("conn", 4434, direction="both")
        info = wait_p2p(world, "relay", timeout=10)
        assert info["direct_failures"] >= 1
        r = dl.finish()
        assert r["rc"] == 0 and r["sha256"] == www[1], r     # finished over the relay
        lab.unblock_udp("conn", 4434)
        info = wait_p2p(world, "direct", timeout=COOLDOWN + 20)
        assert info["switches_to_direct"] >= 2
        r = world.curl(url(world), max_time=90)
        assert r["rc"] == 0 and r["sha256"] == www[1], r
        assert p2p(world)["path"] == "direct"
    finally:
        world.close()


def test_agent_restart_goes_direct_again(lab_factory: Any, tmp_path: Path,
                                        www: tuple[Path, str]) -> None:
    """A restarted Agent (same state dir) gets its direct path back. Its session tickets
    lived in the previous process's memory (the native TLS keeps them there), so this
    handshake is a full one; reconnects within one process resume in 0-RTT
    (tests/quic/test_zero_rtt.py)."""
    lab = lab_factory(nat_a="cone", nat_b="cone", ip="4")
    world = start(lab, tmp_path, www[0])
    try:
        assert wait_p2p(world, "direct")["handshake"] == "full"
        world.stop_agent()
        world.agent_runs += 1
        world.agent = world.spawn("agent", [
            PY, "-m", "ztna", "agent", "--intermediate", world.inter, "--server-name", "ztna-intermediate",
            "--pki", str(world.pki), "--service", f"web={VIP4}", "--mode", "tun",
            "--name", "lab", "--tun-name", "ztna0", "--state-dir", str(world.state)],
            f"agent-{world.agent_runs}-datagram")
        assert wait_p2p(world, "direct")["handshake"] == "full"
        r = world.curl(url(world), max_time=90)
        assert r["rc"] == 0 and r["sha256"] == www[1], r
    finally:
        world.close()
