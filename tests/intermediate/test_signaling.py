"""Signaling sessions: bound to one Agent and the Connector the Intermediate picked."""

from __future__ import annotations

import random

import pytest

from ztna.intermediate.registry import Notify, Registry
from ztna.intermediate.signaling import Signaling
from ztna.wire.control import decode_control_frame as decode_control
from ztna.wire.control import encode_control
from ztna.wire.control_messages import (
    Candidate,
    ErrorMessage,
    PunchAnswer,
    PunchOffer,
    PunchRequest,
    PunchResult,
    PunchStart,
    StandingCandidates,
)
from ztna.wire.registration import Register, Role

AGENT, CONNECTOR, INTRUDER, OTHER_AGENT = 1, 2, 3, 4
A_CANDS = (Candidate("srflx", "203.0.113.11", 40001, 1694498815, "s1"),)
C_CANDS = (Candidate("host", "2001:db8:2::10", 4434, 2130706431, "h1"),
           Candidate("srflx", "203.0.113.12", 4434, 1694498815, "s2"))


class _Allow:
    scoped = True

    def allows(self, role: str, service: str) -> bool:
        return True


def _world() -> tuple[Registry, Signaling]:
    reg = Registry()
    for peer in (AGENT, CONNECTOR, INTRUDER, OTHER_AGENT):
        reg.add_peer(peer, _Allow())
    reg.register(AGENT, Register(role=Role.AGENT, service_id="web"))
    reg.register(OTHER_AGENT, Register(role=Role.AGENT, service_id="web"))
    reg.register(CONNECTOR, Register(role=Role.CONNECTOR, service_id="web"))
    sig = Signaling(rng=random.Random(42).randbytes, ttl=10.0, max_per_agent=2, max_sessions=3)
    return reg, sig


def _roundtrip(notes: list[Notify]) -> list[Notify]:
    # Every message must survive the real control-stream encoding.
    return [Notify(n.peer, decode_control(encode_control(n.message))) for n in notes]


def _offer(sig: Signaling, reg: Registry, agent: int = AGENT, now: float = 0.0) -> PunchOffer:
    (note,) = _roundtrip(sig.handle(agent, PunchRequest("web", A_CANDS), reg, now=now))
    assert note.peer == CONNECTOR and isinstance(note.message, PunchOffer)
    return note.message


def test_full_exchange() -> None:
    reg, sig = _world()
    offer = _offer(sig, reg)
    assert (offer.agent, offer.service, offer.candidates) == (AGENT, "web", A_CANDS)
    notes = _roundtrip(sig.handle(CONNECTOR, PunchAnswer(offer.session, C_CANDS), reg, now=0.1))
    by_peer = {n.peer: n.message for n in notes}
    a, c = by_peer[AGENT], by_peer[CONNECTOR]
    assert isinstance(a, PunchStart) and isinstance(c, PunchStart)
    assert (a.role, c.role) == ("controlling", "controlled")
    assert a.peer_candidates == C_CANDS and c.peer_candidates == A_CANDS
    assert a.key == c.key and len(a.key_bytes) == 32 and a.session == c.session == offer.session
    # The result goes to the other party and closes the session.
    (fwd,) = sig.handle(AGENT, PunchResult(offer.session, True, "203.0.113.12", 4434), reg, now=0.3)
    assert fwd.peer == CONNECTOR and fwd.message.ok
    assert sig.sessions == {}
    assert _metric(sig, "ztna_signaling_results_total", {"outcome": "direct"}) == 1


def test_ids_and_keys_come_from_the_rng() -> None:
    reg, sig = _world()
    rng = random.Random(42)
    offer = _offer(sig, reg)
    assert offer.session == int.from_bytes(rng.randbytes(8), "big")
    assert sig.sessions[offer.session].key == rng.randbytes(32)


def test_answer_from_anyone_but_the_picked_connector_is_ignored() -> None:
    reg, sig = _world()
    offer = _offer(sig, reg)
    for intruder in (INTRUDER, AGENT, OTHER_AGENT):
        assert sig.handle(intruder, PunchAnswer(offer.session, C_CANDS), reg, now=0.1) == []
    assert _metric(sig, "ztna_signaling_ignored_total", {"reason": "not_bound"}) == 3
    assert not sig.sessions[offer.session].started
    assert sig.handle(INTRUDER, PunchResult(offer.session, False), reg, now=0.1) == []
    assert offer.session in sig.sessions
    # Unknown session, duplicate answer, client-sent offers/starts: ignored and counted.
    assert sig.handle(CONNECTOR, PunchAnswer(offer.session ^ 1, C_CANDS), reg, now=0.1) == []
    assert len(sig.handle(CONNECTOR, PunchAnswer(offer.session, C_CANDS), reg, now=0.1)) == 2
    assert sig.handle(CONNECTOR, PunchAnswer(offer.session, C_CANDS), reg, now=0.1) == []
    assert sig.handle(INTRUDER, offer, reg, now=0.1) == []
    assert _metric(sig, "ztna_signaling_ignored_total", {"reason": "unknown_session"}) == 1
    assert _metric(sig, "ztna_signaling_ignored_total", {"reason": "duplicate_answer"}) == 1
    assert _metric(sig, "ztna_signaling_ignored_total", {"reason": "unexpected_type"}) == 1


def test_request_requires_agent_registration_and_a_connector() -> None:
    reg, sig = _world()
    assert sig.handle(INTRUDER, PunchRequest("web", A_CANDS), reg, now=0.0) == []
    assert _metric(sig, "ztna_signaling_ignored_total", {"reason": "not_agent"}) == 1
    reg.register(AGENT, Register(role=Role.AGENT, service_id="db"))
    (note,) = sig.handle(AGENT, PunchRequest("db", A_CANDS), reg, now=0.0)
    assert note.peer == AGENT and isinstance(note.message, ErrorMessage)
    assert note.message.code == "no_connector"
    assert sig.sessions == {}


def test_bounds_and_replacement() -> None:
    reg, sig = _world()
    first = _offer(sig, reg)
    second = _offer(sig, reg)                      # same agent + service: replaces
    assert list(sig.sessions) == [second.session]
    _offer(sig, reg, OTHER_AGENT)
    reg.register(AGENT, Register(role=Role.AGENT, service_id="db"))
    reg.register(CONNECTOR, Register(role=Role.CONNECTOR, service_id="db"))
    sig.handle(AGENT, PunchRequest("db", A_CANDS), reg, now=0.0)
    assert len(sig.sessions) == 3
    reg.register(OTHER_AGENT, Register(role=Role.AGENT, service_id="db"))
    (busy,) = sig.handle(OTHER_AGENT, PunchRequest("db", A_CANDS), reg, now=0.0)
    assert busy.message.code == "busy" and len(sig.sessions) == 3
    assert first.session not in sig.sessions


def test_per_agent_bound_evicts_oldest() -> None:
    reg, sig = _world()
    for svc in ("a", "b", "c"):
        reg.register(AGENT, Register(role=Role.AGENT, service_id=svc))
        reg.register(CONNECTOR, Register(role=Role.CONNECTOR, service_id=svc))
    ids = []
    for svc in ("a", "b", "c"):
        (n,) = sig.handle(AGENT, PunchRequest(svc, A_CANDS), reg, now=0.0)
        ids.append(n.message.session)
    assert list(sig.sessions) == ids[1:]


def test_expiry_and_peer_gone() -> None:
    reg, sig = _world()
    offer = _offer(sig, reg, now=0.0)
    assert sig.handle(CONNECTOR, PunchAnswer(offer.session, C_CANDS), reg, now=10.5) == []
    assert _metric(sig, "ztna_signaling_sessions_expired_total") == 1
    offer = _offer(sig, reg, now=11.0)
    (note,) = sig.peer_gone(CONNECTOR)
    assert note.peer == AGENT and note.message.code == "punch_aborted"
    assert note.message.session == offer.session and sig.sessions == {}
    assert sig.peer_gone(CONNECTOR) == []


def _metric(sig: Signaling, name: str, labels: dict[str, str] | None = None) -> float:
    for n, _kind, _help, value, lab in sig.metrics():
        if n == name and lab == labels:
            return value
    pytest.fail(f"no metric {name} {labels}")


def test_standing_candidates_start_both_sides_at_once() -> None:
    reg, sig = _world()
    # Only a registered Connector may publish standing candidates.
    assert sig.handle(INTRUDER, StandingCandidates(C_CANDS), reg, now=0.0) == []
    assert sig.standing == {}
    assert sig.handle(CONNECTOR, StandingCandidates(C_CANDS), reg, now=0.0) == []
    notes = _roundtrip(sig.handle(AGENT, PunchRequest("web", A_CANDS), reg, now=0.1))
    by_peer = {n.peer: n.message for n in notes}
    a, c = by_peer[AGENT], by_peer[CONNECTOR]   # no offer/answer round trip
    assert isinstance(a, PunchStart) and isinstance(c, PunchStart)
    assert a.peer_candidates == C_CANDS and c.peer_candidates == A_CANDS and a.key == c.key
    assert _metric(sig, "ztna_signaling_fast_starts_total", None) == 1
    # A late answer for a started session changes nothing.
    assert sig.handle(CONNECTOR, PunchAnswer(a.session, C_CANDS), reg, now=0.2) == []
    sig.peer_gone(CONNECTOR)
    assert sig.standing == {}
