"""SACK: the scoreboard alone, the endpoint's SACK-based recovery and its own SACK blocks."""

from __future__ import annotations

import random

from test_tcp import PISN, S1, new, out, seg

from ztna.netstack.packets import SYN
from ztna.netstack.sack import MAX_RANGES, SackScoreboard, receiver_blocks
from ztna.netstack.tcp import TcpEndpoint, TcpState

M = 0xFFFFFFFF


def test_scoreboard_merges_clips_and_prunes() -> None:
    sb = SackScoreboard()
    assert sb.update([(200, 300), (500, 600)], una=100, snd_max=1000) == 200
    assert sb.update([(300, 350), (250, 320)], una=100, snd_max=1000) == 50   # adjacent merge
    assert sb.ranges == [(200, 350), (500, 600)] and sb.sacked == 250 and sb.high == 600
    assert sb.update([(50, 120), (900, 1200)], una=100, snd_max=1000) == 120  # clipped both ends
    assert sb.ranges == [(100, 120), (200, 350), (500, 600), (900, 1000)]
    assert sb.hole_at(100) == (120, 200) and sb.hole_at(210) == (350, 500)
    assert sb.hole_at(950) is None and sb.hole_at(1000) is None
    assert sb.sacked_between(110, 520) == 10 + 150 + 20
    sb.advance(250)
    assert sb.ranges == [(250, 350), (500, 600), (900, 1000)] and sb.sacked == 300
    assert sb.update([(150, 900)], una=250, snd_max=1000) == 450              # fills every hole
    assert sb.ranges == [(250, 1000)] and sb.sacked == 750
    sb.advance(2000)
    assert not sb and sb.sacked == 0


def test_scoreboard_range_cap() -> None:
    sb = SackScoreboard()
    sb.update([(i * 10, i * 10 + 5) for i in range(MAX_RANGES + 10)], una=0, snd_max=10**6)
    assert len(sb.ranges) == MAX_RANGES and sb.sacked == MAX_RANGES * 5


def test_receiver_blocks_most_recent_first() -> None:
    ranges = [(10, 20), (30, 40), (50, 60), (70, 80)]
    assert receiver_blocks(ranges, 35, 3) == ((30, 40), (70, 80), (50, 60))
    assert receiver_blocks(ranges, None, 1) == ((70, 80),)
    assert receiver_blocks([], 5, 3) == ()


def sack_established(window: int = 1000) -> TcpEndpoint:
    ep = new()
    ep.on_segment(seg(PISN, flags=SYN, mss=1400, wscale=7, window=64000, sack_permitted=True),
                  now=0.0)
    ep.accept(now=0.0)
    (synack,) = out(ep)
    assert synack.sack_permitted
    ep.on_segment(seg(PISN + 1, synack.seq + 1, window=window), now=0.01)
    assert ep.state is TcpState.ESTABLISHED
    return ep


def test_recovery_resends_every_hole_in_one_round_and_skips_sacked() -> None:
    ep = sack_established()
    ep.send(bytes(range(256)) * 40)                  # 10 240 bytes: 11 segments of ≤ 1000
    first = out(ep, 0.02)
    assert len(first) == 10                          # initial window
    starts = [(s.seq - S1) & M for s in first]
    # Segments 0, 2, 4 and 6 are lost; the peer SACKs 1, 3, 5, 7, 8, 9.
    got = [i for i in range(10) if i not in (0, 2, 4, 6)]
    blocks: list[tuple[int, int]] = []
    for n, i in enumerate(got):
        blocks = [((S1 + starts[i]) & M, (S1 + starts[i] + 1000) & M)] + blocks
        ep.on_segment(seg(PISN + 1, S1, window=1000, sack_blocks=tuple(blocks[:4])),
                      now=0.05 + n * 0.001)
    resent = out(ep, 0.06)
    resent_starts = sorted((s.seq - S1) & M for s in resent if s.payload)
    # All four holes in one go (not one per RTT); nothing the peer already holds.
    assert resent_starts[:4] == [0, 2000, 4000, 6000]
    assert not set(resent_starts) & {starts[i] for i in got}
    for s in resent:
        assert bytes(s.payload) == (bytes(range(256)) * 40)[(s.seq - S1) & M:][:len(s.payload)]


def test_no_sack_blocks_unless_offered() -> None:
    ep = new()
    ep.on_segment(seg(PISN, flags=SYN, mss=1400, wscale=7, window=64000), now=0.0)
    ep.accept(now=0.0)
    (synack,) = out(ep)
    assert not synack.sack_permitted
    ep.on_segment(seg(PISN + 1, synack.seq + 1), now=0.01)
    ep.on_segment(seg(PISN + 1 + 100, S1, payload=b"x" * 100), now=0.02)
    (ack,) = out(ep, 0.02)
    assert ack.ack == PISN + 1 and ack.sack_blocks == ()


def test_we_send_sack_blocks_for_out_of_order_data() -> None:
    ep = sack_established()
    base = PISN + 1
    ep.on_segment(seg(base + 100, S1, payload=b"b" * 100), now=0.02)
    ep.on_segment(seg(base + 300, S1, payload=b"d" * 100), now=0.03)
    acks = out(ep, 0.03)
    assert acks[-1].ack == base
    assert acks[-1].sack_blocks == ((base + 300, base + 400), (base + 100, base + 200))
    ep.on_segment(seg(base + 200, S1, payload=b"c" * 100), now=0.04)   # joins two blocks
    (ack,) = out(ep, 0.04)
    assert ack.sack_blocks == ((base + 100, base + 400),)
    ep.on_segment(seg(base, S1, payload=b"a" * 100), now=0.05)         # fills the hole
    (ack,) = out(ep, 0.05)
    assert ack.ack == base + 400 and ack.sack_blocks == ()
    assert ep.read() == b"a" * 100 + b"b" * 100 + b"c" * 100 + b"d" * 100


def test_timeout_go_back_skips_sacked_ranges() -> None:
    ep = sack_established()
    data = random.Random(4).randbytes(5000)
    ep.send(data)
    first = out(ep, 0.02)
    assert len(first) == 5
    # The peer SACKs segments 1 and 3 only (two: below the recovery threshold), then silence.
    ep.on_segment(seg(PISN + 1, S1, window=1000,
                      sack_blocks=(((S1 + 3000) & M, (S1 + 4000) & M),
                                   ((S1 + 1000) & M, (S1 + 2000) & M))), now=0.05)
    assert out(ep, 0.05) == []
    deadline = 0.05 + ep.rto                          # past the tail-loss probe too
    ep.on_timer(now=deadline)
    sent = []
    t = deadline
    for _ in range(4):                                # slow start after the timeout
        segs = [s for s in out(ep, t) if s.payload]
        if not segs:
            break
        sent += segs
        top = max((s.seq - S1) & M for s in segs) + 1000
        ep.on_segment(seg(PISN + 1, (S1 + top) & M, window=1000), now=t + 0.01)
        t += 0.01
    assert sorted((s.seq - S1) & M for s in sent) == [0, 2000, 4000]


def test_tail_loss_probe_then_early_retransmit_before_the_rto() -> None:
    ep = sack_established()
    ep.send(b"z" * 3000)
    assert len(out(ep, 0.02)) == 3
    # The first ACK gives an RTT sample of 10 ms; the last two segments are lost.
    ep.on_segment(seg(PISN + 1, (S1 + 1000) & M, window=1000), now=0.03)
    deadline = ep.next_deadline()
    assert deadline is not None and deadline < 0.03 + ep.rto
    ep.on_timer(now=deadline)
    (probe,) = out(ep, deadline)
    assert (probe.seq - S1) & M == 2000 and len(probe.payload) == 1000   # the last segment
    # Its SACK (one of two outstanding) is enough to resend the hole at once.
    ep.on_segment(seg(PISN + 1, (S1 + 1000) & M, window=1000,
                      sack_blocks=(((S1 + 2000) & M, (S1 + 3000) & M),)), now=deadline + 0.01)
    (rtx,) = [s for s in out(ep, deadline + 0.01) if s.payload]
    assert (rtx.seq - S1) & M == 1000
