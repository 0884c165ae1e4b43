"""Presence records and the placement every member computes from them (pure), then the leases
between real member processes: a member's Connectors show up on the others, vanish when it
stops (at once) or is killed (when its lease runs out), and a garbage record is skipped."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import IntermediateProc, Peer, RedisProc, member

from ztna import limits
from ztna.certs import init_pki
from ztna.cluster.presence import ClusterView, Presence, place
from ztna.errors import DecodeError
from ztna.quic.config import TlsFiles
from ztna.wire import RegistrationAck, Role

pytestmark = pytest.mark.timeout(120)


def test_record_round_trip_and_exact_bytes() -> None:
    p = Presence("203.0.113.7:4433", {"web": ("connector#3", "connector-2#9")}, {"web": 2})
    data = p.encode()
    assert data == (b'{"v":1,"member":"203.0.113.7:4433",'
                    b'"connectors":{"web":["connector#3","connector-2#9"]},"agents":{"web":2}}')
    assert Presence.decode(data) == p


@pytest.mark.parametrize("data", [
    b"not json", b"[]", b'{"v":2,"member":"a:1","connectors":{},"agents":{}}',
    b'{"v":1,"connectors":{},"agents":{}}', b'{"v":1,"member":"a:1","connectors":{"w":"x"},"agents":{}}',
    b'{"v":1,"member":"a:1","connectors":{},"agents":{"w":-1}}', b"\xff\xfe",
    b'{"v":1,"member":"a:1","connectors":{},"agents":{},"pad":"' + b"x" * 300_000 + b'"}',
])
def test_bad_records_are_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        Presence.decode(data)


def records() -> list[Presence]:
    return [
        Presence("10.0.0.1:4433", {"web": ("c1#1", "c2#2")}),
        Presence("10.0.0.2:4433", {"web": ("c3#1",), "ssh": ("c4#5",)}, {"web": 1}),
        Presence("10.0.0.3:4433", {}, {"ssh": 3}),
    ]


def view_of(member: str, recs: list[Presence]) -> ClusterView:
    own = next(p for p in recs if p.member == member)
    view = ClusterView(member)
    view.apply(own, [p for p in reversed(recs) if p.member != member])
    return view


def test_every_member_places_every_flow_on_the_same_connector() -> None:
    views = [view_of(p.member, records()) for p in records()]
    keys = [bytes([17]) + n.to_bytes(4, "big") * 2 + n.to_bytes(4, "big") for n in range(500)]
    for key in keys:
        picks = {v.place("web", key) for v in views}
        assert len(picks) == 1
    spread = {views[0].place("web", k) for k in keys}
    assert spread == {("10.0.0.1:4433", "c1#1"), ("10.0.0.1:4433", "c2#2"), ("10.0.0.2:4433", "c3#1")}
    assert views[2].place("nothing", keys[0]) is None
    assert views[0].services()["ssh"] == {"connectors": ["10.0.0.2:4433/c4#5"], "agents": {"10.0.0.3:4433": 3}}


def test_a_member_leaving_moves_only_its_flows() -> None:
    full = view_of("10.0.0.1:4433", records())
    before = {k: full.place("web", k) for k in (n.to_bytes(8, "big") for n in range(500))}
    full.apply(records()[0], [records()[2]])       # 10.0.0.2's lease ran out
    for key, pick in before.items():
        now = full.place("web", key)
        assert now == pick or pick == ("10.0.0.2:4433", "c3#1"), (pick, now)
        assert now is not None and now[0] == "10.0.0.1:4433"
    assert place(b"k", []) is None


# ---------------------------------------------------------------------------- processes

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo"])
    return d


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProc]:
    proc = RedisProc(tmp_path / "redis").start()
    yield proc
    proc.kill()


def view(proc: IntermediateProc) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/healthz", timeout=2) as r:
        cluster = json.loads(r.read())["cluster"]
    assert isinstance(cluster, dict)
    return cluster


async def wait_for(pred: object, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():  # type: ignore[operator]
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_leases_between_members(pki: Path, redis: RedisProc, tmp_path: Path) -> None:
    i1 = member(pki, redis, tmp_path / "i1.log").start()
    i2 = member(pki, redis, tmp_path / "i2.log").start()
    i3 = member(pki, redis, tmp_path / "i3.log").start()
    n1, n2, n3 = (f"127.0.0.1:{p.port}" for p in (i1, i2, i3))
    redis.command("SET", "ztna:presence:garbage", "{not a record")

    async def main() -> None:
        connector = await Peer().connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await connector.register(Role.CONNECTOR, "echo"), RegistrationAck)
        agent = await Peer().connect("127.0.0.1", i2.port, TlsFiles.from_dir(pki, "agent"))
        assert isinstance(await agent.register(Role.AGENT, "echo"), RegistrationAck)

        def sees_all() -> bool:
            v = view(i3)
            services = v["services"]
            assert isinstance(services, dict)
            echo = services.get("echo", {})
            return (v["members"] == sorted([n1, n2, n3])
                    and len(echo.get("connectors", [])) == 1
                    and echo["connectors"][0].startswith(f"{n1}/connector#")
                    and echo.get("agents") == {n2: 1})

        await wait_for(sees_all, 3 * limits.CLUSTER_LEASE_REFRESH + 2)
        assert i3.metrics()["ztna_cluster_bad_presence_records_total"] >= 1
        assert i3.metrics()["ztna_cluster_members"] == 3

        # A graceful stop withdraws the record: gone at the others' next refresh.
        assert i2.stop() == 0, i2.log()
        # Waited for less than a lease, so the record went by the withdrawal, not by expiry.
        assert limits.CLUSTER_LEASE_REFRESH + 2 < limits.CLUSTER_LEASE
        await wait_for(lambda: n2 not in view(i3)["members"], limits.CLUSTER_LEASE_REFRESH + 2)
        # A killed member's record lives until its lease runs out, then it is gone too.
        i1.signal(signal.SIGKILL)
        assert i1.proc is not None
        i1.proc.wait()
        await wait_for(lambda: view(i3)["members"] == [n3], limits.CLUSTER_LEASE + limits.CLUSTER_LEASE_REFRESH + 2)
        assert "echo" not in view(i3)["services"]  # type: ignore[operator]
        await connector.close()
        await agent.close()

    try:
        asyncio.run(main())
    finally:
        i1.stop()
        i2.stop()
        assert i3.stop() == 0, i3.log()
    assert "unreadable presence record" in i3.log()
