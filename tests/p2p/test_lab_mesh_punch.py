"""Lab test (root): hole punching across a cluster mesh, through real NATs in namespaces.

The relay host runs redis-server and two `ztna intermediate --cluster` members (I1 on 4433,
I2 on 4435, member certificates, each advertising the relay's public address); the Connector
behind NAT B attaches to I2, the TUN-mode Agent behind NAT A to I1. The punch signaling
crosses I1 → I2 and back (the session runs on I2, which holds the Connector), the Agent and
the Connector get a direct path through both (cone) NATs, and a download through it from the
app host is byte-exact (sha256) while the mesh carries none of the service's packets."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from ztna.certs import init_pki, issue
from ztna.worlds.lab_tun import PY, VIP4, World, make_files

pytestmark = pytest.mark.root

SIZE = 8 * 1024 * 1024
REDIS_PORT = 6391
METRICS = {"i1": 9301, "i2": 9302}


def metrics(world: World, member: str) -> dict[str, float]:
    script = ("import urllib.request,sys;"
              f"sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:{METRICS[member]}/metrics',"
              "timeout=3).read().decode())")
    r = world.lab.run("relay", [PY, "-c", script], check=False)
    out: dict[str, float] = {}
    for line in r.stdout.splitlines():
        name, _, value = line.rpartition(" ")
        if name and not name.startswith("#"):
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def test_agent_and_connector_on_two_members_punch_through_nats(lab_factory: Any, tmp_path: Path) -> None:
    redis = shutil.which("redis-server")
    if redis is None:
        pytest.fail("redis-server is not installed (.ci/run installs it)")
    lab = lab_factory(nat_a="cone", nat_b="cone", ip="4", delay_ms=5)
    world = World(lab, tmp_path)
    relay = lab.addr("relay", 4)
    www = tmp_path / "www"
    www.mkdir()
    digest = make_files(www, {"big.bin": SIZE})["big.bin"]
    init_pki(world.pki, ["web"], hosts=["ztna-intermediate", relay])
    issue(world.pki, "member", "member", out_prefix=world.pki / "member")
    try:
        world.spawn("app", [PY, "-m", "http.server", "--bind", world.app, "8080", "--directory", str(www)], "http")
        world.spawn("relay", [redis, "--bind", "127.0.0.1", "--port", str(REDIS_PORT), "--dir", str(tmp_path),
                              "--save", "", "--appendonly", "no"], "redis")
        time.sleep(0.5)
        for name, port in (("i1", 4433), ("i2", 4435)):
            world.spawn("relay", [
                PY, "-m", "ztna", "intermediate", "--pki", str(world.pki), "--listen", f"0.0.0.0:{port}",
                "--metrics", f"127.0.0.1:{METRICS[name]}", "--cluster", f"redis://127.0.0.1:{REDIS_PORT}/0",
                "--advertise", f"{relay}:{port}"], name)
        time.sleep(1.0)
        world.spawn("conn", [PY, "-m", "ztna", "connector", "--intermediate", f"{relay}:4435",
                             "--server-name", "ztna-intermediate", "--pki", str(world.pki), "--metrics", "off",
                             "--service", f"web={VIP4};tcp:80={world.app}:8080"], "connector")
        world.agent = world.spawn("agent", [
            PY, "-m", "ztna", "agent", "--intermediate", f"{relay}:4433", "--server-name", "ztna-intermediate",
            "--pki", str(world.pki), "--service", f"web={VIP4}", "--mode", "tun", "--name", "lab",
            "--tun-name", "ztna0", "--state-dir", str(world.state)], "agent-1-datagram")
        world.agent_runs = 1
        snap = world.wait("direct", timeout=45)
        info = snap["p2p"]["services"]["web"]
        assert info["path"] == "direct" and info["punch"]["state"] == "nominated", json.dumps(info)
        r = world.curl(f"http://{VIP4}/big.bin", max_time=90)
        assert r["rc"] == 0 and r["sha256"] == digest, r
        assert (world.status() or {})["p2p"]["services"]["web"]["path"] == "direct"
        m1, m2 = metrics(world, "i1"), metrics(world, "i2")
        # The session ran on I2 (the Connector's member); I1 only passed its messages on.
        assert m2.get("ztna_signaling_sessions_total", 0) >= 1, m2
        assert m1.get("ztna_signaling_sessions_total", 0) == 0
        assert m1.get('ztna_mesh_signals_total{direction="forwarded"}', 0) >= 2, m1
        assert m2.get('ztna_signaling_results_total{outcome="direct"}', 0) >= 1
        # The download took the direct path: no TCP stream crossed the mesh.
        assert m1.get('ztna_mesh_streams_total{direction="forwarded"}', 0) == 0
    finally:
        world.close()
