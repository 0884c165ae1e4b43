"""The one keepalive + CID-rotation rule (`UpkeepSchedule`), with time passed in."""

from __future__ import annotations

from ztna.quic.maintenance import UpkeepSchedule


def _run(schedule: UpkeepSchedule, *, until: float, step: float,
         heard: list[float] | None = None) -> tuple[list[float], list[float]]:
    """Step a fake clock; `heard` are the times the peer was heard from. Returns the times
    of PINGs and rotations."""
    pings, rotations, last = [], [], 0.0
    heard = sorted(heard or [])
    now = 0.0
    while now < until:
        now = round(now + step, 6)
        while heard and heard[0] <= now:
            last = heard.pop(0)
        ping, rotate = schedule.due(now=now, last_received=last)
        if ping:
            pings.append(now)
        if rotate:
            rotations.append(now)
    return pings, rotations


def test_an_idle_connection_pings_once_per_interval_and_rotates_on_time() -> None:
    s = UpkeepSchedule(keepalive=10.0, cid_rotation=300.0, now=0.0)
    pings, rotations = _run(s, until=610.0, step=1.0)
    assert pings == [10.0 * i for i in range(1, 62)]
    assert rotations == [300.0, 600.0]


def test_traffic_postpones_the_ping() -> None:
    s = UpkeepSchedule(keepalive=10.0, cid_rotation=None, now=0.0)
    pings, rotations = _run(s, until=40.0, step=1.0, heard=[5.0, 12.0, 19.0])
    assert pings == [29.0, 39.0] and rotations == []


def test_a_silent_peer_is_pinged_on_every_pass_with_a_zero_gap() -> None:
    s = UpkeepSchedule(keepalive=2.0, cid_rotation=None, now=0.0, ping_gap=0.0)
    pings, _ = _run(s, until=3.0, step=0.25)
    assert pings == [2.0, 2.25, 2.5, 2.75, 3.0]
    assert s.next_deadline(last_received=3.0) == 5.0


def test_disabled_parts_and_the_next_deadline() -> None:
    s = UpkeepSchedule(keepalive=None, cid_rotation=None, now=0.0)
    assert s.due(now=1e9, last_received=0.0) == (False, False)
    assert s.next_deadline(last_received=0.0) is None
    s = UpkeepSchedule(keepalive=10.0, cid_rotation=30.0, now=100.0)
    assert s.next_deadline(last_received=95.0) == 110.0       # the last PING is the start
    assert s.next_deadline(last_received=108.0) == 118.0      # heard later: later PING
    assert UpkeepSchedule(keepalive=None, cid_rotation=30.0, now=100.0).next_deadline(
        last_received=0.0) == 130.0
