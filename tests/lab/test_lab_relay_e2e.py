"""End to end on the lab (root), relay path through both NATs: IPv4, dual-stack
and IPv6-only. The Connector's P2P port is blocked, so everything rides the Intermediate.
The Agent cannot reach the app without the tunnel (checked first); through the TUN an HTTP
download to the service's virtual IP(s) is sha256-exact, in both TCP carriages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ztna.worlds.lab_tun import VIP4, VIP6, make_files, tun_world

pytestmark = pytest.mark.root

SIZE = 3 * 1024 * 1024


@pytest.fixture(scope="module")
def www(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("www")
    return d, make_files(d, {"blob.bin": SIZE})["blob.bin"]


@pytest.mark.parametrize("ip,transport", [("4", "datagram"), ("dual", "stream"), ("6only", "datagram"),
                                          ("6only", "stream")])
def test_relay_path_through_both_nats(lab_factory: Any, tmp_path: Path, www: tuple[Path, str],
                                      ip: str, transport: str) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip=ip)
    lab.block_udp("conn", 4434, direction="both")      # no direct path: relay only
    fam = 6 if ip == "6only" else 4
    app = lab.addr("app", fam)
    host = f"[{app}]" if fam == 6 else app
    # Without the tunnel the private app is unreachable from the Agent's network.
    r = lab.run("agent", ["curl", "-sS", "-g", "--max-time", "2", f"http://{host}:8080/"], check=False)
    assert r.returncode != 0
    with tun_world(lab, tmp_path, www[0]) as world:
        world.start_agent(transport)
        snap = world.wait("relay", timeout=30)
        assert snap["intermediate"]["state"] == "connected"
        vips = [VIP6] if ip == "6only" else ([VIP4, VIP6] if ip == "dual" else [VIP4])
        for vip in vips:
            url = f"http://[{vip}]/blob.bin" if ":" in vip else f"http://{vip}/blob.bin"
            res = world.curl(url, max_time=90)
            assert res["rc"] == 0 and res["sha256"] == www[1], (vip, res, world.agent_log()[-1500:])
        snap = world.status() or {}
        assert snap["services"][0]["path"] == "relay"
