"""Punch sessions on both sides exchanging real probe bytes through simulated NATs."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from ztna.p2p.candidates import gather
from ztna.p2p.punch import TRANSITIONS, Event, PunchConfig, PunchSession, PunchState, Send
from ztna.wire.probe import ProbeRequest, ProbeResponse, decode_probe, encode_probe

from .netsim import Host, Internet, Nat

KEY = bytes(range(1, 33))
SESSION = 0x1234_5678_9ABC_DEF0
RELAY = ("198.51.100.1", 4433)


@dataclass
class Side:
    hosts: dict[int, Host]
    session: PunchSession | None = None
    sent: list[tuple[float, Send]] = field(default_factory=list)

    def host_for(self, ip: str) -> Host:
        return self.hosts[6 if ":" in ip else 4]


def _qad(net: Internet, host: Host, relay: Host) -> tuple[str, int]:
    relay.inbox.clear()
    net.send(host, b"qad", RELAY)
    net.now += net.delay
    net.deliver_due()
    (_, _, src), = relay.inbox
    return src


def make_world(a: tuple[str, str] | None, b: tuple[str, str] | None, *, delay: float = 0.01,
               loss: float = 0.0, seed: int = 1, v6: bool = False) -> tuple[Internet, Side, Side, Host]:
    net = Internet(delay=delay, loss=loss, seed=seed)
    relay = net.add_host(Host(RELAY))
    sides = []
    for i, nat_kind in ((1, a), (2, b)):
        hosts: dict[int, Host] = {}
        if nat_kind is None:
            hosts[4] = net.add_host(Host((f"203.0.113.{10 + i}", 40000 + i)))
        else:
            nat = net.add_nat(Nat(f"203.0.113.{10 + i}", mapping=nat_kind[0], filtering=nat_kind[1],
                                  rng=random.Random(seed * 10 + i)))
            hosts[4] = net.add_host(Host((f"10.{i}.0.10", 40000 + i), nat))
        if v6:
            # Routed IPv6 behind a stateful firewall: no translation, filtering only.
            ip6 = f"2001:db8:{i}::10"
            fw = net.add_nat(Nat(ip6, mapping="eim", filtering="apdf"))
            hosts[6] = net.add_host(Host((ip6, hosts[4].addr[1]), fw))
        sides.append(Side(hosts))
    return net, sides[0], sides[1], relay


def start(net: Internet, agent: Side, conn: Side, relay: Host, *, config: PunchConfig | None = None,
          seed: int = 3, start_in: float = 0.0) -> None:
    cands = []
    for side in (agent, conn):
        observed = _qad(net, side.hosts[4], relay)
        addrs = [h.addr[0] for h in side.hosts.values()]
        cands.append(gather(side.hosts[4].addr[1], addrs, observed=observed, relay=RELAY))
    rng = random.Random(seed)
    now = net.now
    agent.session = PunchSession(session=SESSION, key=KEY, controlling=True, local=cands[0],
                                 remote=cands[1], rng=rng.randbytes, now=now,
                                 start_at=now + start_in, config=config)
    conn.session = PunchSession(session=SESSION, key=KEY, controlling=False, local=cands[1],
                                remote=cands[0], rng=rng.randbytes, now=now, config=config)


def run(net: Internet, sides: list[Side], until: float = 5.0) -> None:
    end = net.now + until
    while net.now < end:
        if not net.step([t for s in sides if s.session for t in [s.session.next_deadline()] if t is not None]):
            return
        for side in sides:
            assert side.session is not None
            sends: list[Send] = []
            for host in side.hosts.values():
                inbox, host.inbox = host.inbox, []
                for _, data, src in inbox:
                    sends += side.session.on_datagram(data, src, now=net.now)
            sends += side.session.on_timer(now=net.now)
            for s in sends:
                side.sent.append((net.now, s))
                net.send(side.host_for(s.addr[0]), s.data, s.addr)
        if all(s.session and s.session.done for s in sides) and net.next_time() is None:
            return


CONE = ("eim", "apdf")        # Linux masquerade: the lab's "cone"
CONE_ADF = ("eim", "adf")
SYMMETRIC = ("edm", "apdf")


def test_cone_to_cone_succeeds_both_ways() -> None:
    net, agent, conn, relay = make_world(CONE, CONE)
    start(net, agent, conn, relay)
    run(net, [agent, conn])
    assert agent.session.state is PunchState.NOMINATED
    assert conn.session.state is PunchState.NOMINATED
    # The Agent talks to the Connector's NAT mapping, the Connector to the Agent's.
    assert agent.session.selected == ("203.0.113.12", 40002)
    assert conn.session.selected == ("203.0.113.11", 40001)
    # Both sides probed (the original's checks were one-directional).
    assert conn.session.stats.requests_sent > 0 and agent.session.stats.requests_sent > 0
    assert ("203.0.113.11", 40001) in agent.session.mapped
    # Fake clock: a couple of round trips of 20 ms plus settle, nowhere near 500 ms.
    assert agent.session.nominated_at - agent.session.started_at < 0.1


def test_cone_to_symmetric_fails_cleanly() -> None:
    net, agent, conn, relay = make_world(CONE, SYMMETRIC)
    start(net, agent, conn, relay)
    run(net, [agent, conn])
    for side in (agent, conn):
        s = side.session
        assert s.state is PunchState.FAILED
        assert s.selected is None
        assert s.failed_at - s.started_at == pytest.approx(s.config.check_timeout)
        # Paced retries, no storm: at most a dozen requests per remote address.
        assert s.stats.requests_sent <= 12 * len(s.pairs)
        assert not any(t > s.failed_at for t, _ in side.sent if decode_probe(_.data, KEY).__class__ is ProbeRequest)


def test_symmetric_to_symmetric_fails() -> None:
    net, agent, conn, relay = make_world(SYMMETRIC, SYMMETRIC)
    start(net, agent, conn, relay)
    run(net, [agent, conn])
    assert agent.session.state is PunchState.FAILED and conn.session.state is PunchState.FAILED


def test_peer_reflexive_learning_beats_symmetric_with_address_filtering() -> None:
    # The symmetric side's mapping towards the peer is unknown in advance; the cone side
    # (address-dependent filtering) lets its requests in and learns it as prflx.
    net, agent, conn, relay = make_world(CONE_ADF, SYMMETRIC)
    start(net, agent, conn, relay)
    run(net, [agent, conn])
    assert agent.session.state is PunchState.NOMINATED
    assert agent.session.stats.prflx_learned >= 1
    assert agent.session.pairs[agent.session.selected].remote.kind == "prflx"
    assert agent.session.selected != ("203.0.113.12", 40002)  # not the QAD srflx port


def test_public_connector_and_lossy_link() -> None:
    net, agent, conn, relay = make_world(CONE, None, loss=0.3, seed=5)
    start(net, agent, conn, relay)
    run(net, [agent, conn])
    assert agent.session.state is PunchState.NOMINATED
    assert agent.session.selected == ("203.0.113.12", 40002)


def test_ipv6_preferred_when_both_work() -> None:
    net, agent, conn, relay = make_world(CONE, CONE, v6=True)
    start(net, agent, conn, relay)
    run(net, [agent, conn])
    assert agent.session.state is PunchState.NOMINATED
    assert agent.session.selected == ("2001:db8:2::10", 40002)
    assert conn.session.selected == ("2001:db8:1::10", 40001)
    v4 = [p for p in agent.session.pairs.values() if ":" not in p.addr[0] and p.succeeded]
    assert v4, "IPv4 also worked; IPv6 won on priority"


def test_retry_pacing_and_stop() -> None:
    cfg = PunchConfig()
    net, agent, conn, relay = make_world(CONE, CONE)
    start(net, agent, conn, relay, config=cfg)
    net.blocked.add("203.0.113.12")  # the Connector's side is unreachable
    run(net, [agent, conn])
    times = [t for t, s in agent.sent if s.addr == ("203.0.113.12", 40002)]
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
    assert gaps[:4] == pytest.approx([0.025, 0.0375, 0.05625, 0.084375])
    assert max(gaps) <= cfg.max_interval + 1e-9
    assert times[-1] < agent.session.started_at + cfg.check_timeout
    assert agent.session.state is PunchState.FAILED


def test_start_delay_and_early_peer() -> None:
    # The Agent (public here, so unsolicited requests reach it) is told to start in 1 s but
    # the Connector starts now: the Agent starts as soon as an authenticated request arrives.
    net, agent, conn, relay = make_world(None, CONE)
    start(net, agent, conn, relay, start_in=1.0)
    run(net, [agent, conn])
    assert agent.session.state is PunchState.NOMINATED
    assert agent.session.started_at < agent.session.start_at


def _session(controlling: bool = False) -> PunchSession:
    remote = gather(4434, ["192.0.2.7"])
    return PunchSession(session=SESSION, key=KEY, controlling=controlling,
                        local=gather(5000, ["192.0.2.1"]), remote=remote,
                        rng=random.Random(1).randbytes, now=0.0)


def test_unauthenticated_probes_are_not_answered() -> None:
    s = _session()
    req = ProbeRequest(SESSION, b"\xaa" * 12, nominate=True, controlling=True)
    assert s.on_datagram(encode_probe(req, bytes(32)), ("192.0.2.9", 1), now=0.0) == []
    assert s.stats.bad_mac == 1
    assert s.on_datagram(b"\x21\x01garbage", ("192.0.2.9", 1), now=0.0) == []
    assert s.stats.malformed == 1
    other = ProbeRequest(SESSION + 1, b"\xaa" * 12, nominate=False, controlling=True)
    assert s.on_datagram(encode_probe(other, KEY), ("192.0.2.9", 1), now=0.0) == []
    assert s.stats.wrong_session == 1
    assert s.state is PunchState.WAITING and s.selected is None


def test_answer_carries_the_source_and_triggers_a_check() -> None:
    s = _session()
    req = ProbeRequest(SESSION, b"\xaa" * 12, nominate=False, controlling=True)
    out = s.on_datagram(encode_probe(req, KEY), ("::ffff:192.0.2.7", 4434, 0, 0), now=1.0)
    resp = decode_probe(out[0].data, KEY)
    assert isinstance(resp, ProbeResponse)
    assert (resp.txid, resp.mapped_ip, resp.mapped_port) == (b"\xaa" * 12, "192.0.2.7", 4434)
    assert out[0].addr == ("192.0.2.7", 4434)
    assert s.state is PunchState.PROBING  # an early peer starts us
    assert isinstance(decode_probe(out[1].data, KEY), ProbeRequest)


def test_response_matched_by_txid_and_source() -> None:
    s = _session(controlling=True)
    (send,) = s.on_timer(now=0.0)
    req = decode_probe(send.data, KEY)
    resp = encode_probe(ProbeResponse(SESSION, req.txid, "203.0.113.1", 5000), KEY)
    s.on_datagram(resp, ("192.0.2.66", 4434), now=0.01)       # right txid, wrong sender
    assert s.stats.wrong_source == 1 and s.state is PunchState.PROBING
    bogus = encode_probe(ProbeResponse(SESSION, b"\x01" * 12, "203.0.113.1", 5000), KEY)
    s.on_datagram(bogus, ("192.0.2.7", 4434), now=0.01)
    assert s.stats.unknown_txid == 1 and s.state is PunchState.PROBING
    out = s.on_datagram(resp, ("192.0.2.7", 4434), now=0.02)
    assert s.pairs[("192.0.2.7", 4434)].rtt == pytest.approx(0.02)
    # The only pair, so nothing better can come: nominated at once, no settle wait.
    assert s.state is PunchState.NOMINATED and s.selected == ("192.0.2.7", 4434)
    nominate = decode_probe(out[-1].data, KEY)
    assert isinstance(nominate, ProbeRequest) and nominate.nominate and nominate.controlling


def test_role_conflict_is_ignored() -> None:
    s = _session(controlling=True)
    req = ProbeRequest(SESSION, b"\xaa" * 12, nominate=False, controlling=True)
    assert s.on_datagram(encode_probe(req, KEY), ("192.0.2.7", 4434), now=0.0) == []
    assert s.stats.role_conflicts == 1


def test_transition_table() -> None:
    assert TRANSITIONS[(PunchState.WAITING, Event.START)] is PunchState.PROBING
    assert TRANSITIONS[(PunchState.PROBING, Event.TIMEOUT)] is PunchState.FAILED
    # Terminal states have no way out.
    assert not [k for k in TRANSITIONS if k[0] in (PunchState.NOMINATED, PunchState.FAILED)]
    s = _session()
    s.close(now=0.0)
    assert s.state is PunchState.FAILED and s.on_timer(now=1.0) == [] and s.next_deadline() is None


def test_relay_candidates_are_never_probed() -> None:
    remote = gather(4434, ["192.0.2.7"], relay=RELAY)
    s = PunchSession(session=SESSION, key=KEY, controlling=True, local=gather(5000, ["192.0.2.1"]),
                     remote=remote, rng=random.Random(1).randbytes, now=0.0)
    assert [s.addr for s in s.on_timer(now=0.0)] == [("192.0.2.7", 4434)]
