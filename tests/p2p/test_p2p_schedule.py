"""The P2P socket's one timer (`ztna.p2p.schedule`) and its probe routing
(`ztna.p2p.router`), in memory: a float clock, two routers passing real probe bytes to each
other through the seeded NAT simulator, no sockets."""

from __future__ import annotations

import random

import pytest

from ztna.p2p.candidates import gather
from ztna.p2p.punch import PunchConfig, PunchSession, PunchState
from ztna.p2p.router import ProbeRouter, Progress
from ztna.p2p.schedule import Job, P2PSchedule
from ztna.wire.probe import ProbeRequest, encode_probe

from .netsim import Host, Internet, Nat

KEY = bytes(range(1, 33))
RELAY = ("198.51.100.1", 4433)


def schedule(now: float = 100.0) -> P2PSchedule:
    return P2PSchedule(now=now, keepalive=15.0, interface_refresh=10.0, handshake_timeout=10.0)


# ---------------------------------------------------------------------- the schedule
def test_qad_and_interfaces_start_at_once_then_each_keeps_its_own_period() -> None:
    s = schedule()
    assert s.next_due() == 100.0
    assert s.due(100.0) == [Job.QAD_CONNECT, Job.INTERFACES]
    assert s.next_due() is None                     # each job waits for its handler's report
    s.qad_connecting(100.0)
    s.interfaces_listing()
    assert s.next_due() == 110.0                    # the handshake timeout
    s.qad_up(100.2)
    assert s.at(Job.QAD_TIMEOUT) is None and s.next_due() == pytest.approx(115.2)
    s.interfaces_listed(100.5)
    assert s.next_due() == pytest.approx(110.5)
    assert s.due(110.4) == []
    assert s.due(110.5) == [Job.INTERFACES]
    assert s.due(115.2) == [Job.QAD_PING]
    s.qad_pinged(115.2)
    assert s.at(Job.QAD_PING) == pytest.approx(130.2)


def test_a_handshake_that_never_finishes_times_out_and_retries_after_the_backoff() -> None:
    s = schedule()
    s.due(100.0)
    s.qad_connecting(100.0)
    assert s.due(109.9) == []
    assert s.due(110.0) == [Job.QAD_TIMEOUT]
    s.qad_down(110.0, retry_in=2.0)
    assert s.at(Job.QAD_CONNECT) == 112.0 and s.at(Job.QAD_PING) is None


def test_a_close_while_up_drops_the_ping_and_reconnects_later() -> None:
    s = schedule()
    s.due(100.0)
    s.qad_connecting(100.0)
    s.qad_up(101.0)
    s.qad_down(105.0, retry_in=0.7)
    assert s.at(Job.QAD_PING) is None and s.at(Job.QAD_TIMEOUT) is None
    assert s.due(105.7) == [Job.QAD_CONNECT]


def test_moving_to_another_intermediate_reconnects_now() -> None:
    s = schedule()
    s.due(100.0)
    s.qad_connecting(100.0)
    s.qad_up(101.0)
    s.qad_moved(140.0)
    assert s.due(140.0) == [Job.QAD_CONNECT]
    assert s.at(Job.QAD_PING) is None


def test_probe_deadline_is_one_job_among_the_others() -> None:
    s = schedule()
    s.due(100.0)
    s.qad_connecting(100.0)
    s.probes_at(100.025)
    assert s.next_due() == 100.025
    assert s.due(100.03) == [Job.PROBES]
    s.probes_at(None)
    assert s.next_due() == 110.0


# ---------------------------------------------------------------------- probe routing
class Side:
    def __init__(self, net: Internet, host: Host, router: ProbeRouter[str]) -> None:
        self.net, self.host, self.router = net, host, router
        self.progress: list[Progress[str]] = []

    def take(self, progress: Progress[str] | None) -> None:
        if progress is None:
            return
        self.progress.append(progress)
        for s in progress.sends:
            self.net.send(self.host, s.data, s.addr)


def world(session_id: int, *, nat: bool = True) -> tuple[Internet, Side, Side, PunchSession, PunchSession]:
    net = Internet(delay=0.01, seed=2)
    hosts = []
    for i in (1, 2):
        gw = net.add_nat(Nat(f"203.0.113.{10 + i}", mapping="eim", filtering="apdf",
                             rng=random.Random(i))) if nat else None
        hosts.append(net.add_host(Host((f"10.{i}.0.10" if nat else f"203.0.113.{10 + i}", 40000 + i), gw)))
    net.add_host(Host(RELAY))
    cands = []
    for h in hosts:
        # srflx as QAD would report it: the NAT's mapping towards the relay.
        observed = h.nat.outbound(h.addr, RELAY) if h.nat is not None else None
        cands.append(gather(h.addr[1], [h.addr[0]], observed=observed, relay=RELAY))
    rng = random.Random(5)
    now = net.now
    a = PunchSession(session=session_id, key=KEY, controlling=True, local=cands[0], remote=cands[1],
                     rng=rng.randbytes, now=now, config=PunchConfig(settle_min=0.0, settle_max=0.0))
    b = PunchSession(session=session_id, key=KEY, controlling=False, local=cands[1], remote=cands[0],
                     rng=rng.randbytes, now=now)
    return (net, Side(net, hosts[0], ProbeRouter(max_sessions=64)),
            Side(net, hosts[1], ProbeRouter(max_sessions=256, linger=10.0)), a, b)


def drive(net: Internet, sides: list[Side], until: float) -> None:
    """One timer per side, as the driver runs it: wake at min(router deadline, delivery)."""
    end = net.now + until
    while net.now < end:
        if not net.step([t for s in sides for t in [s.router.next_deadline(now=net.now)] if t is not None]):
            return
        for side in sides:
            inbox, side.host.inbox = side.host.inbox, []
            for _, data, src in inbox:
                side.take(side.router.route(data, src, now=net.now))
            for p in side.router.on_timer(now=net.now):
                side.take(p)


def test_two_routers_punch_through_cone_nats_and_report_each_end_once() -> None:
    net, agent, conn, a, b = world(0xAB)
    agent.take(agent.router.add(a, "web", now=net.now))
    conn.take(conn.router.add(b, "", now=net.now))
    drive(net, [agent, conn], until=3.0)
    assert a.state is PunchState.NOMINATED and b.state is PunchState.NOMINATED
    assert a.selected == ("203.0.113.12", 40002) and b.selected == ("203.0.113.11", 40001)
    for side in (agent, conn):
        assert [p.route.session.state for p in side.progress if p.finished] == [PunchState.NOMINATED]
        assert side.router.unknown_session == 0 and side.router.not_a_probe == 0
    assert {p.route.tag for p in agent.progress} == {"web"}


def test_garbage_foreign_sessions_and_bad_macs_are_counted_by_reason() -> None:
    net, agent, conn, a, b = world(0xCD, nat=False)
    conn.router.add(b, "", now=net.now)
    src = ("203.0.113.11", 40001)
    assert conn.router.route(b"\x01garbage", src, now=net.now) is None
    foreign = encode_probe(ProbeRequest(0xEE, bytes(12), False, True), KEY)
    assert conn.router.route(foreign, src, now=net.now) is None
    forged = encode_probe(ProbeRequest(0xCD, bytes(12), False, True), bytes(32))
    progress = conn.router.route(forged, src, now=net.now)
    assert progress is not None and progress.sends == []    # routed, then dropped by the session
    assert (conn.router.not_a_probe, conn.router.unknown_session) == (1, 1)
    assert conn.router.session_drops["bad_mac"] == 1


def test_sessions_are_bounded_and_ended_ones_linger_then_go() -> None:
    router: ProbeRouter[int] = ProbeRouter(max_sessions=2, linger=10.0)
    sessions = [world(sid)[3] for sid in (1, 2, 3)]
    for i, s in enumerate(sessions):
        router.add(s, i, now=0.0)
    assert [s.session for s in router.sessions()] == [2, 3]     # the oldest went first
    third = sessions[2]
    third.close(now=0.0)
    assert third.done
    router.next_deadline(now=5.0)
    assert router.get(3) is not None                           # still answering late probes
    router.next_deadline(now=10.5)
    assert router.get(3) is None and router.get(2) is not None


def test_a_silenced_session_retransmits_nothing_but_still_routes() -> None:
    net, agent, conn, a, b = world(0x77, nat=False)
    first = agent.router.add(a, "web", now=net.now)
    assert first.sends                                          # the first checks went out
    agent.router.silence(0x77)
    assert agent.router.next_deadline(now=net.now) is None
    assert agent.router.on_timer(now=net.now + 1.0) == []
    conn.take(conn.router.add(b, "", now=net.now))
    net.now += 0.02
    net.deliver_due()
    inbox, agent.host.inbox = agent.host.inbox, []
    routed = [agent.router.route(data, src, now=net.now) for _, data, src in inbox]
    assert routed and all(p is not None and p.route.tag == "web" for p in routed)
    agent.router.discard(0x77)
    assert agent.router.route(inbox[0][1], inbox[0][2], now=net.now) is None
    assert agent.router.unknown_session == 1
