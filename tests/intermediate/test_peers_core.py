"""Peer ids, stable-id adoption, early holds (`ztna.intermediate.peers`, `ztna.early`) and QAD
replies (`ztna.intermediate.qad`), in memory: no sockets, times passed in."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ztna.early import EarlyHold
from ztna.errors import DatagramTooLarge
from ztna.identity import stable_peer_id
from ztna.intermediate.peers import (
    EARLY_HOLD_PACKETS,
    EARLY_HOLD_SECONDS,
    Adopt,
    EarlyFlight,
    PeerIds,
    registration_hold,
)
from ztna.intermediate.qad import qad_reply, send_qad
from ztna.intermediate.registry import AllowAll, Registry
from ztna.wire import Hello, ObservedAddress, Ping, Register, Role, decode_qad, encode_control
from ztna.wire.control import decode_control_frame


def test_early_flight_replays_control_before_datagrams() -> None:
    flight = EarlyFlight()
    # 0-RTT: a tunnel packet may be packed before the Hello and the Register it depends on
    assert flight.hold_datagram(b"\x2fpacket-1")
    assert flight.hold_message(Hello(instance=7))
    assert flight.hold_datagram(b"\x2fpacket-2")
    assert flight.hold_message(Register(role=Role.AGENT, service_id="web"))
    messages, datagrams = flight.take()
    assert messages == [Hello(instance=7), Register(role=Role.AGENT, service_id="web")]
    assert datagrams == [b"\x2fpacket-1", b"\x2fpacket-2"]
    assert flight.take() == ([], [])


def test_early_flight_is_bounded() -> None:
    flight = EarlyFlight()
    assert all(flight.hold_message(Ping(id=n)) for n in range(EarlyFlight.MESSAGES))
    assert not flight.hold_message(Ping(id=999))
    assert flight.hold_datagram(bytes(EarlyFlight.DATAGRAM_BYTES - 10))
    assert not flight.hold_datagram(bytes(11))       # would pass the byte budget
    assert flight.hold_datagram(bytes(10))           # exactly fills it
    messages, datagrams = flight.take()
    assert messages == [Ping(id=n) for n in range(EarlyFlight.MESSAGES)]
    assert [len(d) for d in datagrams] == [EarlyFlight.DATAGRAM_BYTES - 10, 10]


def test_registration_hold_counts_and_time() -> None:
    created = 100.0
    hold = registration_hold(created)
    assert all(hold.hold(bytes([i]), now=created + 0.5) for i in range(EARLY_HOLD_PACKETS))
    assert not hold.hold(b"one too many", now=created + 0.5)
    assert hold.release() == [bytes([i]) for i in range(EARLY_HOLD_PACKETS)]
    assert not hold.hold(b"after release", now=created + 0.5) and len(hold) == 0
    late = registration_hold(created)
    assert late.hold(b"just in time", now=created + EARLY_HOLD_SECONDS)
    assert not late.hold(b"too late", now=created + EARLY_HOLD_SECONDS + 0.001)
    assert late.take() == [b"just in time"]
    assert late.hold(b"take keeps it open", now=created + 1.0)


def test_early_hold_of_the_direct_server_keeps_order_until_the_hello() -> None:
    pending: EarlyHold[tuple[str, bytes]] = EarlyHold(3)
    for n in range(4):
        pending.hold(("web", bytes([n])))
    assert pending.release() == [("web", b"\x00"), ("web", b"\x01"), ("web", b"\x02")]
    assert not pending.hold(("web", b"late"))


def test_peer_ids_skip_ids_in_use_and_wrap() -> None:
    ids = PeerIds()
    used = {1, 2, 4}
    assert [ids.next_id(used.__contains__) for _ in range(3)] == [3, 5, 6]
    ids._next = 0xFFFFFFFF
    assert ids.next_id(used.__contains__) == 0xFFFFFFFF
    assert ids.next_id(used.__contains__) == 3       # wrapped past 0 and the ids in use


FP = "ab" * 32


def _registry(*peers: int) -> Registry:
    reg = Registry()
    for p in peers:
        reg.add_peer(p, AllowAll(), f"p{p}")
    return reg


def test_adoption_of_the_stable_id() -> None:
    ids = PeerIds()
    stable = stable_peer_id(FP, 7)
    reg = _registry(5)
    adopt = ids.adoption(reg, {5}, 5, FP, 7)
    assert adopt == Adopt(stable, (FP, 7), supersede=False)
    ids.adopted(adopt)
    assert ids.instances == {stable: (FP, 7)}
    # the same client reconnects (same certificate, same Hello instance): the stale
    # connection holding the id is superseded
    reg.add_peer(stable, AllowAll(), "stale")
    reg.add_peer(6, AllowAll(), "p6")
    assert ids.adoption(reg, {stable, 6}, 6, FP, 7) == Adopt(stable, (FP, 7), supersede=True)
    # another client whose id collides (or another instance) keeps its sequential id
    assert ids.adoption(reg, {stable, 6}, 6, FP, 8) != Adopt(stable, (FP, 8), supersede=True)
    ids.instances[stable] = ("cd" * 32, 7)
    assert ids.adoption(reg, {stable, 6}, 6, FP, 7) is None
    ids.forget(stable)
    assert ids.instances == {}


def test_no_adoption_after_registering_or_onto_a_remote_agent() -> None:
    ids = PeerIds()
    reg = _registry(5)
    reg.register(5, Register(role=Role.AGENT, service_id="web"))
    assert ids.adoption(reg, {5}, 5, FP, 7) is None          # only before the first registration
    reg = _registry(5, stable_peer_id(FP, 7))                 # a remote Agent (the mesh) has the id
    assert ids.adoption(reg, {5}, 5, FP, 7) is None
    assert ids.adoption(_registry(), set(), 5, FP, 7) is None  # not a peer (gone)


def test_qad_reply_matches_the_protocol_vector() -> None:
    reply = qad_reply(("203.0.113.5", 54321))
    assert reply.datagram == bytes.fromhex("01 04 cb007105 d431")   # docs/protocol.md qad/v4
    assert reply.address == ObservedAddress("203.0.113.5", 54321)
    assert decode_control_frame(reply.control) == reply.address
    assert reply.control == bytes.fromhex("0008 01 04 cb007105 d431")   # length 8, type 0x01, body


@pytest.mark.parametrize(("seen", "told"), [
    (("::ffff:203.0.113.5", 54321, 0, 0), ("203.0.113.5", 54321)),   # dual-stack socket, IPv4 peer
    (("fe80::1%eth0", 4433, 0, 2), ("fe80::1", 4433)),               # zone id is ours, not theirs
    (("2001:db8::7", 1, 0, 0), ("2001:db8::7", 1)),
])
def test_qad_reports_the_address_as_the_peer_reads_it(seen: tuple[object, ...], told: tuple[str, int]) -> None:
    reply = qad_reply(seen)
    assert (reply.address.ip, reply.address.port) == told
    assert decode_qad(reply.datagram) == reply.address


@dataclass
class _Peer:
    peer_address: tuple[str, int]
    limit: int
    datagrams: list[bytes] = field(default_factory=list)
    frames: list[bytes] = field(default_factory=list)

    def send_datagram(self, data: bytes) -> bool:
        if len(data) > self.limit:
            raise DatagramTooLarge(len(data), self.limit)
        self.datagrams.append(data)
        return True

    def send_control(self, frame: bytes) -> None:
        self.frames.append(frame)


def test_send_qad_falls_back_to_the_control_stream() -> None:
    roomy, tight = _Peer(("2001:db8::7", 443), 1200), _Peer(("2001:db8::7", 443), 8)
    send_qad(roomy)
    send_qad(tight)
    addr = ObservedAddress("2001:db8::7", 443)
    assert roomy.datagrams == [qad_reply(roomy.peer_address).datagram] and len(roomy.datagrams[0]) == 20
    assert tight.datagrams == []      # 20 bytes do not fit: the control message still goes
    assert roomy.frames == tight.frames == [encode_control(addr)]
