"""End-to-end transfers between the test peer and TcpEndpoint over a simulated lossy link."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from netstack_sim import Link, Peer, Sim
from ztna.netstack.packets import ip_to_bytes
from ztna.netstack.tcp import TcpEndpoint, TcpState

A = ip_to_bytes("100.64.0.2")
S = ip_to_bytes("10.99.0.2")
A6 = ip_to_bytes("fd00::2")
S6 = ip_to_bytes("fd00::99")


def make_sim(*, up_data: bytes, down_data: bytes, seed: int = 1, loss: float = 0.0,
             dup: float = 0.0, jitter: float = 0.0, v6: bool = False, mss: int = 1200,
             peer_mss: int = 1200, wscale: int | None = 7, budget: int = 64) -> Sim:
    a, s = (A6, S6) if v6 else (A, S)
    rng = random.Random(seed)
    peer = Peer(ip=a, port=40000, server_ip=s, server_port=80, isn=0xFFFFF000,
                mss=peer_mss, wscale=wscale, data=up_data)
    ep = TcpEndpoint(local_ip=s, local_port=80, remote_ip=a, remote_port=40000,
                     isn=0xFFFFFF00, mss=mss, now=0.0)
    return Sim(peer=peer, ep=ep, up=Link(rng, loss, dup, 0.02, jitter),
               down=Link(rng, loss, dup, 0.02, jitter), backend_out=down_data, budget=budget)


def finish(sim: Sim, *, limit: float = 120.0) -> None:
    peer, ep = sim.peer, sim.ep
    sim.run(lambda: peer.state == "ESTABLISHED", limit=limit)
    sim.run(lambda: len(peer.received) == len(sim.backend_out) and peer.fin_received
            and sim.peer.snd_una == sim.peer.iss + 1 + len(peer.data), limit=limit)
    peer.want_fin = True
    sim.run(lambda: ep.closed and peer.fin_acked, limit=limit)


def test_clean_transfer_both_directions_wraps_sequence_space() -> None:
    up = random.Random(5).randbytes(100_000)
    down = random.Random(6).randbytes(150_000)
    sim = make_sim(up_data=up, down_data=down)
    finish(sim)
    assert bytes(sim.got) == up
    assert bytes(sim.peer.received) == down
    assert not sim.ep.reset
    assert sim.ep.peer_closed


def test_ipv6_transfer_with_small_mss() -> None:
    up = bytes(range(256)) * 100
    sim = make_sim(up_data=up, down_data=up[::-1], v6=True, mss=700, peer_mss=1400)
    finish(sim)
    assert bytes(sim.got) == up and bytes(sim.peer.received) == up[::-1]
    assert max(len(s.payload) for s in sim.peer.segments_seen) == 700


def test_lossy_reordering_duplicating_link_is_byte_exact() -> None:
    up = random.Random(1).randbytes(60_000)
    down = random.Random(2).randbytes(60_000)
    sim = make_sim(up_data=up, down_data=down, loss=0.1, dup=0.05, jitter=0.03, seed=7)
    finish(sim, limit=300)
    assert bytes(sim.got) == up and bytes(sim.peer.received) == down


def test_no_window_scale_when_peer_does_not_offer_it() -> None:
    down = random.Random(3).randbytes(100_000)
    sim = make_sim(up_data=b"", down_data=down, wscale=None)
    finish(sim)
    synack = sim.peer.segments_seen[0]
    assert synack.wscale is None
    assert bytes(sim.peer.received) == down


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), loss=st.floats(0.0, 0.15), dup=st.floats(0.0, 0.1),
       jitter=st.floats(0.0, 0.05), budget=st.integers(1, 64))
def test_random_impairment_200k_both_ways(seed: int, loss: float, dup: float, jitter: float,
                                          budget: int) -> None:
    rng = random.Random(seed)
    up, down = rng.randbytes(200_000), rng.randbytes(200_000)
    sim = make_sim(up_data=up, down_data=down, seed=seed, loss=loss, dup=dup, jitter=jitter,
                   budget=budget)
    finish(sim, limit=900)
    assert bytes(sim.got) == up
    assert bytes(sim.peer.received) == down
    assert sim.ep.state is TcpState.CLOSED and not sim.ep.reset
