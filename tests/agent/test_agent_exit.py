"""Agent exit in the namespace lab (root): applications are told at once, nothing is left.

* SIGTERM while curl downloads over the direct path: curl ends within seconds with
  "connection reset" — with TCP over QUIC streams (the Agent resets the redirected kernel
  sockets, SO_LINGER 0) and with TCP in DATAGRAMs (the Agent writes RSTs into the TUN).
* SIGKILL of a stream-mode Agent: its nftables table (an owner table, tied to the process)
  is gone at once, so TCP to the virtual IP is no longer redirected to a dead listener
  (which would answer "connection refused" until the next start).
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ztna import procs
from ztna.worlds.lab_tun import PY, VIP4, World, make_files

pytestmark = pytest.mark.root

CONNECT = ("import socket,sys\n"
           "s=socket.socket(); s.settimeout(2)\n"
           "try:\n s.connect((sys.argv[1],80)); print('connected')\n"
           "except ConnectionRefusedError: print('refused')\n"
           "except OSError as e: print('other', e)\n")


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("www")
    return d, make_files(d, {"big.bin": 16 * 1024 * 1024})["big.bin"]


@pytest.mark.parametrize("transport", ["stream", "datagram"])
def test_sigterm_resets_app_connections_and_sigkill_leaves_no_redirect(
        lab_factory: Any, tmp_path: Path, www: tuple[Path, str], transport: str) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip="4", delay_ms=5)
    world = World(lab, tmp_path)
    try:
        world.start_infra(www[0])
        world.start_agent(transport)
        world.wait("direct", timeout=30)
        result: dict[str, Any] = {}
        done = threading.Event()

        def download() -> None:
            result.update(world.curl(f"http://{VIP4}/big.bin", max_time=90, extra=("--limit-rate", "1M")))
            done.set()

        threading.Thread(target=download, daemon=True).start()
        out = tmp_path / "curl.out"
        deadline = time.monotonic() + 20
        while not (out.exists() and out.stat().st_size > 512 * 1024) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not done.is_set(), result
        assert world.agent is not None
        stopped = time.monotonic()
        world.agent.terminate()                                # SIGTERM
        # Bound generous for a loaded machine; without the resets curl hangs for its 90 s.
        assert done.wait(15.0), "curl still hanging 15 s after the Agent's SIGTERM"
        took = time.monotonic() - stopped
        print(f"{transport}: curl ended {took:.2f} s after SIGTERM: rc {result['rc']} {result['stderr']}")
        assert result["rc"] == 56 and "reset" in result["stderr"].lower(), result
        world.agent.wait(10)
        assert world.agent.returncode == 0
        assert "ztna_lab" not in world.nft_tables()

        if transport == "stream":
            world.start_agent("stream")
            world.wait(None, timeout=30)
            assert "table inet ztna_lab" in world.nft_tables()
            r = world.curl(f"http://{VIP4}/big.bin", max_time=60)
            assert r["rc"] == 0 and r["sha256"] == www[1], r
            world.stop_agent(kill=True)                        # SIGKILL: no cleanup code runs
            killed = time.monotonic()
            while "ztna_lab" in world.nft_tables() and time.monotonic() - killed < 10:
                time.sleep(0.05)
            gone = time.monotonic() - killed
            assert "ztna_lab" not in world.nft_tables(), world.nft_tables()
            print(f"nft table gone {gone:.2f} s after SIGKILL")
            # Not sent to the dead listener any more (that would be an instant refusal).
            r2 = lab.run("agent", [PY, "-c", CONNECT, VIP4], check=False)
            assert "refused" not in r2.stdout, r2.stdout
    finally:
        world.close()


def test_owner_table_dies_with_its_holder(tmp_path: Path) -> None:
    """The nftables owner table itself, without a lab: it exists while its holder lives and
    disappears when the holder process is SIGKILLed."""
    import os

    from agent_util import netns, nsexec, spawn

    holder = ("import asyncio,sys\n"
              "from ztna.agent.tcp_redirect import OwnedTable, ruleset\n"
              "async def main():\n"
              " t=OwnedTable('ztna_t')\n"
              " await t.create(ruleset('ztna_t',['10.100.0.2'],[],4000,0))\n"
              " print('ready',flush=True)\n"
              " await asyncio.sleep(60)\n"
              "asyncio.run(main())\n")
    ns = f"ztot{os.getpid() % 100000}"
    with netns(ns):
        p = spawn(ns, PY, "-c", holder, log=tmp_path / "holder.log")
        try:
            procs.wait_until(lambda: "ready" in (tmp_path / "holder.log").read_text(), timeout=15,
                             what="the holder's nft table", watch=[p], error=AssertionError,
                             detail=lambda: (tmp_path / "holder.log").read_text())
            listing = nsexec(ns, "nft", "list", "table", "inet", "ztna_t").stdout
            assert "flags owner" in listing and "redirect to :4000" in listing, listing
            procs.stop(p, sig=signal.SIGKILL, grace=5)
            deadline = time.monotonic() + 10
            while "ztna_t" in nsexec(ns, "nft", "list", "tables").stdout and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "ztna_t" not in nsexec(ns, "nft", "list", "tables").stdout
        finally:
            procs.stop(p, sig=signal.SIGKILL)
