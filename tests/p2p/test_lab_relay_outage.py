"""Lab test (root): an established direct path outlives the Intermediate.

Cone/cone lab, TUN Agent, `web` tcp:80 on the app host. Once the service is direct, a
rate-limited 20 MB download starts and the Intermediate is SIGKILLed under it. The
download must finish byte-exact (sha256) on the direct path, a new connection opened while
the Intermediate is dead must work (over the direct path: there is no other), and after the
Intermediate comes back the Agent reconnects to it with the service still direct. Both TCP
carriages: QUIC streams on the direct connection, and TCP packets in its DATAGRAMs.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ztna.worlds.lab_tun import PY, VIP4, World, make_files

pytestmark = pytest.mark.root

SIZE = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("www")
    return d, make_files(d, {"big.bin": SIZE, "small.bin": 1024 * 1024})


def p2p(world: World) -> dict[str, Any]:
    snap = world.status() or {}
    return ((snap.get("p2p") or {}).get("services") or {}).get("web") or {}


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("transport", ["stream", "datagram"])
def test_direct_transfer_survives_intermediate_sigkill(lab_factory: Any, tmp_path: Path,
                                                       www: tuple[Path, dict[str, str]],
                                                       transport: str) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip="4", delay_ms=5)
    world = World(lab, tmp_path)
    try:
        world.start_infra(www[0])
        inter = world.procs[-2]                      # http, intermediate, connector
        world.start_agent(transport)
        wait_until(lambda: p2p(world).get("path") == "direct" and p2p(world).get("warmup_ms") is not None,
                   30, "direct path")
        result: dict[str, Any] = {}
        # ~20 s at the limit (curl overshoots it early on while buffers fill): well beyond the
        # ~8 s the Agent takes to declare the Intermediate dead.
        dl = threading.Thread(target=lambda: result.update(
            world.curl(f"http://{VIP4}/big.bin", max_time=90, extra=("--limit-rate", "1000K"),
                       out=tmp_path / "big.out")), daemon=True)
        dl.start()
        time.sleep(1.5)
        inter.send_signal(signal.SIGKILL)
        inter.wait(10)
        killed = time.monotonic()
        wait_until(lambda: ((world.status() or {}).get("intermediate") or {}).get("state") != "connected",
                   15, "the Agent noticing the Intermediate is gone")
        noticed = time.monotonic() - killed
        assert dl.is_alive(), result          # the download is still under way across that moment

        # While the Intermediate is dead: a new TCP connection, over the direct path.
        small = world.curl(f"http://{VIP4}/small.bin", max_time=20)
        assert small["rc"] == 0 and small["sha256"] == www[1]["small.bin"], small
        dl.join(120)
        assert result.get("rc") == 0 and result.get("sha256") == www[1]["big.bin"], result
        info = p2p(world)
        assert info["path"] == "direct" and info["direct_failures"] == 0, info
        assert ((world.status() or {}).get("intermediate") or {}).get("state") != "connected"
        print(f"{transport}: relay loss noticed {noticed:.1f} s after the SIGKILL; new connection during "
              f"the outage {small.get('time_total')} s; 20 MB finished direct in {result.get('time_total')} s")

        world.spawn("relay", [PY, "-m", "ztna", "intermediate", "--pki", str(world.pki), "--metrics", "off"],
                    "intermediate-2")
        wait_until(lambda: ((world.status() or {}).get("intermediate") or {}).get("state") == "connected",
                   30, "agent reconnected to the new Intermediate")
        world.wait("direct", timeout=20)
        r = world.curl(f"http://{VIP4}/small.bin", max_time=20)
        assert r["rc"] == 0 and r["sha256"] == www[1]["small.bin"], r
        assert p2p(world)["direct_failures"] == 0
    finally:
        world.close()
