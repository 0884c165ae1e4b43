"""TcpEndpoint unit tests with hand-crafted segments and a fake clock."""

from __future__ import annotations

import pytest

from ztna.errors import UsageError
from ztna.netstack.packets import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpSegment,
    build_tcp_packet,
    ip_to_bytes,
    parse_ip,
    parse_tcp,
    verify_checksums,
)
from ztna.netstack.tcp import MAX_RETRIES, TIME_WAIT, TcpEndpoint, TcpState, rst_for_unexpected

A = ip_to_bytes("100.64.0.2")
S = ip_to_bytes("10.99.0.2")
PISN = 5000           # peer's ISN
ISN = 0xFFFFFFF0      # ours: wraps during the tests


def seg(seq: int, ack: int = 0, flags: int = ACK, payload: bytes = b"", window: int = 1000,
        **opts: object) -> TcpSegment:
    pkt = build_tcp_packet(A, S, 40000, 80, seq=seq, ack=ack, flags=flags, window=window,
                           payload=payload, **opts)
    return parse_tcp(pkt, parse_ip(pkt))


def out(ep: TcpEndpoint, now: float = 0.0, budget: int = 100) -> list[TcpSegment]:
    segs = []
    for pkt in ep.poll(now=now, budget=budget):
        assert verify_checksums(pkt)
        ip = parse_ip(pkt)
        assert (ip.src, ip.dst) == (S, A)
        segs.append(parse_tcp(pkt, ip))
    return segs


def new(mss: int = 1000, **kw: int) -> TcpEndpoint:
    return TcpEndpoint(local_ip=S, local_port=80, remote_ip=A, remote_port=40000, isn=ISN,
                       mss=mss, now=0.0, **kw)


def established(syn_payload: bytes = b"", window: int = 1000, **kw: int) -> TcpEndpoint:
    """Handshake done; the peer's window scale is 7 (window field × 128)."""
    ep = new(**kw)
    ep.on_segment(seg(PISN, flags=SYN, mss=1400, wscale=7, window=64000, payload=syn_payload),
                  now=0.0)
    ep.accept(now=0.0)
    (synack,) = out(ep)
    ep.on_segment(seg(PISN + 1 + len(syn_payload), synack.seq + 1, window=window), now=0.01)
    assert ep.state is TcpState.ESTABLISHED
    return ep


S1 = (ISN + 1) & 0xFFFFFFFF   # our first data byte


def test_synack_carries_mss_wscale_and_no_sack() -> None:
    ep = new(mss=1234)
    ep.on_segment(seg(PISN, flags=SYN, mss=1460, wscale=7, window=64240), now=0.0)
    assert out(ep) == []                           # nothing before accept()
    ep.accept(now=0.0)
    (sa,) = out(ep)
    assert sa.flags == SYN | ACK and sa.seq == ISN and sa.ack == PISN + 1
    assert sa.mss == 1234 and sa.wscale == 3 and not sa.sack_permitted
    assert sa.window == 65535                      # unscaled in a SYN, capped


def test_syn_retransmit_before_accept_is_absorbed_and_after_accept_answered() -> None:
    ep = new()
    ep.on_segment(seg(PISN, flags=SYN, mss=1460), now=0.0)
    ep.on_segment(seg(PISN, flags=SYN, mss=1460), now=1.0)
    assert out(ep, 1.0) == [] and ep.state is TcpState.SYN_RECEIVED
    ep.accept(now=1.5)
    assert [s.flags for s in out(ep, 1.5)] == [SYN | ACK]
    ep.on_segment(seg(PISN, flags=SYN, mss=1460), now=2.0)
    assert [s.flags for s in out(ep, 2.0)] == [SYN | ACK]


def test_synack_retransmitted_by_timer() -> None:
    ep = new()
    ep.on_segment(seg(PISN, flags=SYN), now=0.0)
    ep.accept(now=0.0)
    out(ep)
    d = ep.next_deadline()
    assert d == pytest.approx(1.0)
    ep.on_timer(now=d)
    assert [s.flags for s in out(ep, d)] == [SYN | ACK]
    assert ep.next_deadline() == pytest.approx(d + 2.0)


def test_refuse_sends_rst_ack_for_syn() -> None:
    ep = new()
    ep.on_segment(seg(PISN, flags=SYN), now=0.0)
    ep.refuse(now=0.0)
    assert ep.reset and not ep.closed
    (r,) = out(ep)
    assert r.flags == RST | ACK and r.seq == 0 and r.ack == PISN + 1
    assert ep.closed


def test_in_order_data_and_delayed_ack() -> None:
    ep = established()
    ep.on_segment(seg(PISN + 1, S1, payload=b"x" * 1000), now=0.1)   # full-size: delayed
    assert out(ep, 0.1) == [] and ep.next_deadline() == pytest.approx(0.14)
    ep.on_segment(seg(PISN + 1001, S1, flags=ACK | PSH, payload=b"y" * 10), now=0.11)
    (a,) = out(ep, 0.11)
    assert a.ack == PISN + 1011 and a.flags == ACK
    assert ep.read() == b"x" * 1000 + b"y" * 10


def test_reorder_and_duplicates_delivered_exactly_once() -> None:
    ep = established()
    base = PISN + 1
    ep.on_segment(seg(base + 20, S1, payload=b"C" * 10), now=0.1)
    ep.on_segment(seg(base + 10, S1, payload=b"B" * 10), now=0.1)
    ep.on_segment(seg(base + 15, S1, payload=b"b" * 10), now=0.1)   # overlaps B and C
    acks = out(ep, 0.1)
    assert [a.ack for a in acks] == [base] * 3     # duplicate ACKs for fast retransmit
    assert ep.read() == b""
    ep.on_segment(seg(base, S1, payload=b"A" * 12), now=0.2)
    assert ep.read() == b"A" * 10 + b"A" * 2 + b"B" * 8 + b"C" * 10
    ep.on_segment(seg(base, S1, payload=b"A" * 30), now=0.3)        # old duplicate
    assert ep.read() == b""
    assert out(ep, 0.3)[-1].ack == base + 30


def test_data_on_syn_and_fin_is_kept() -> None:
    ep = established(syn_payload=b"hello")
    ep.on_segment(seg(PISN + 6, S1, flags=ACK | FIN, payload=b" world"), now=0.1)
    assert ep.read() == b"hello world"
    assert ep.peer_closed and ep.state is TcpState.CLOSE_WAIT
    assert out(ep, 0.1)[-1].ack == PISN + 13


def test_fin_before_missing_data_waits_for_the_gap() -> None:
    ep = established()
    ep.on_segment(seg(PISN + 4, S1, flags=ACK | FIN, payload=b"def"), now=0.1)
    assert ep.state is TcpState.ESTABLISHED and not ep.peer_closed
    ep.on_segment(seg(PISN + 1, S1, payload=b"abc"), now=0.2)
    assert ep.read() == b"abcdef" and ep.peer_closed
    assert ep.state is TcpState.CLOSE_WAIT


def test_sending_honours_mss_window_and_cwnd() -> None:
    ep = established(window=40)          # 40 × 128 = 5120 bytes of peer window
    assert ep.send(b"z" * 20000) == 20000
    segs = out(ep, 0.1)
    # 5 full segments; the 120-byte tail is held back (sender SWS avoidance)
    assert [len(s.payload) for s in segs] == [1000] * 5
    assert segs[0].seq == S1 and segs[1].seq == (S1 + 1000) & 0xFFFFFFFF
    ep.on_segment(seg(PISN + 1, (S1 + 5000) & 0xFFFFFFFF, window=1000), now=0.2)
    segs = out(ep, 0.2)                  # slow start, RFC 3465 L = 2·SMSS: cwnd 10 → 12
    assert [len(s.payload) for s in segs] == [1000] * 12


def test_send_buffer_backpressure_and_budget_zero_keeps_data() -> None:
    ep = established(send_buffer=4000)
    assert ep.send(b"q" * 10000) == 4000 and ep.send_space() == 0
    assert ep.poll(now=0.1, budget=0) == []
    segs = out(ep, 0.1, budget=2)
    assert len(segs) == 2
    assert len(out(ep, 0.1)) == 2
    ep.on_segment(seg(PISN + 1, (S1 + 4000) & 0xFFFFFFFF), now=0.2)
    assert ep.send_space() == 4000


def test_rto_retransmits_from_oldest_and_backs_off_then_resets() -> None:
    ep = established()
    ep.send(b"a" * 3000)
    assert len(out(ep, 0.1)) == 3
    d = ep.next_deadline()
    ep.on_timer(now=d)
    (r,) = out(ep, d)                    # cwnd collapses to one segment
    assert r.seq == S1 and len(r.payload) == 1000
    d2 = ep.next_deadline()
    assert d2 - d == pytest.approx(2 * (d - 0.1), rel=0.01)
    now = d2
    for _ in range(MAX_RETRIES):
        ep.on_timer(now=now)
        out(ep, now)
        now = ep.next_deadline() or now
    assert ep.reset and ep.state is TcpState.CLOSED
    assert ep.closed


def test_path_change_resends_at_once_without_the_old_paths_backoff() -> None:
    ep = established()
    ep.send(b"a" * 3000)
    assert len(out(ep, 0.1)) == 3
    now = 0.1
    for _ in range(5):                   # the path is dead: five timeouts, each one longer
        now = ep.next_deadline() or now
        ep.on_timer(now=now)
        out(ep, now)
    backed_off = ep.next_deadline()
    assert backed_off is not None and backed_off - now > 10 * ep._rtt.base
    ep.path_changed(now=now + 0.5)       # the relay is back: resend now, not at `backed_off`
    assert ep.next_deadline() == now + 0.5
    ep.on_timer(now=now + 0.5)
    (r,) = out(ep, now + 0.5)
    assert r.seq == S1 and len(r.payload) == 1000
    # The old path's timeouts no longer count towards the reset limit.
    t = now + 0.5
    for _ in range(MAX_RETRIES - 1):
        t = ep.next_deadline() or t
        ep.on_timer(now=t)
        out(ep, t)
    assert not ep.reset and ep.state is not TcpState.CLOSED


def test_fast_retransmit_on_three_duplicate_acks() -> None:
    ep = established()
    ep.send(b"d" * 8000)
    assert len(out(ep, 0.1)) == 8
    for _ in range(4):                   # one new ACK, then three duplicates
        ep.on_segment(seg(PISN + 1, (S1 + 1000) & 0xFFFFFFFF), now=0.15)
    segs = out(ep, 0.15)
    assert segs[0].seq == (S1 + 1000) & 0xFFFFFFFF and len(segs[0].payload) == 1000
    # partial ACK → next hole retransmitted at once (NewReno)
    ep.on_segment(seg(PISN + 1, (S1 + 3000) & 0xFFFFFFFF), now=0.2)
    assert out(ep, 0.2)[0].seq == (S1 + 3000) & 0xFFFFFFFF


def test_zero_window_receive_and_window_update() -> None:
    ep = established(recv_buffer=4000)
    for i in range(4):
        ep.on_segment(seg(PISN + 1 + 1000 * i, S1, payload=b"w" * 1000), now=0.1)
    assert out(ep, 0.1)[-1].window == 0
    # the peer's zero-window probe is answered with the same ACK and window 0
    ep.on_segment(seg(PISN + 4001, S1, payload=b"p"), now=0.5)
    (a,) = out(ep, 0.5)
    assert a.ack == PISN + 4001 and a.window == 0
    assert ep.read(1000) == b"w" * 1000
    assert out(ep, 0.6) == []            # 1000 < min(buffer/2, 2·MSS): no update yet
    ep.read(1000)
    (u,) = out(ep, 0.7)
    assert u.window << 0 == 2000 and u.ack == PISN + 4001   # no wscale shift for 4000 B


def test_persist_probes_zero_window_peer() -> None:
    ep = established(window=0)
    ep.send(b"k" * 500)
    assert out(ep, 0.1) == []
    d = ep.next_deadline()
    assert d is not None
    ep.on_timer(now=d)
    (probe,) = out(ep, d)
    assert probe.seq == ISN and probe.payload == b""       # SND.UNA − 1
    ep.on_segment(seg(PISN + 1, S1, window=10), now=d + 0.05)
    (data,) = out(ep, d + 0.05)
    assert data.payload == b"k" * 500


def test_lost_small_segment_forced_into_a_small_window_is_resent_after_a_timeout() -> None:
    # The stall seen after an Intermediate restart: the receiving application reads slowly,
    # so the peer's window is smaller than a segment; the persist timer forces a small
    # segment out; the path dies and takes it along, and so does the peer's window
    # update (nobody retransmits those). From then on only our timeout can move the flow.
    ep = established(window=4)           # 4 × 128 = 512 bytes, less than the 1000-byte MSS
    ep.send(b"s" * 5000)
    assert out(ep, 0.1) == []            # sender SWS avoidance holds the small window back
    d = ep.next_deadline()
    assert d is not None
    ep.on_timer(now=d)
    (forced,) = out(ep, d)
    assert forced.seq == S1 and len(forced.payload) == 512       # ...then forces it out: lost
    now = d
    for _ in range(3):                   # every timeout resends it; none waits for an ACK
        now = ep.next_deadline() or now
        ep.on_timer(now=now)
        (r,) = out(ep, now)
        assert r.seq == S1 and r.payload == b"s" * 512
    # The resend gets through: the peer ACKs it with the window its reader opened meanwhile.
    ep.on_segment(seg(PISN + 1, (S1 + 512) & 0xFFFFFFFF, window=100), now=now + 0.01)
    segs = out(ep, now + 0.01)
    assert segs and segs[0].seq == (S1 + 512) & 0xFFFFFFFF and len(segs[0].payload) == 1000
    assert not ep.reset


def test_timeout_resends_the_oldest_segment_into_a_shut_window_as_a_probe() -> None:
    ep = established(window=8)           # 1024 bytes
    ep.send(b"t" * 5000)
    (first,) = out(ep, 0.1)              # one full segment fits; the 24-byte rest is held back
    assert len(first.payload) == 1000
    # The peer shrinks its window to zero without acknowledging anything (RFC 9293 allows
    # it). With data in flight no persist probe runs; the timeout must ask instead.
    ep.on_segment(seg(PISN + 1, S1, window=0), now=0.12)
    assert out(ep, 0.12) == []
    d = ep.next_deadline()
    assert d is not None
    ep.on_timer(now=d)
    (probe,) = out(ep, d)
    assert probe.seq == S1 and probe.payload == b"t" * 1000
    ep.on_segment(seg(PISN + 1, (S1 + 1000) & 0xFFFFFFFF, window=8), now=d + 0.01)
    (nxt,) = out(ep, d + 0.01)
    assert nxt.seq == (S1 + 1000) & 0xFFFFFFFF


def test_challenge_ack_for_future_ack_and_in_window_rst() -> None:
    ep = established()
    ep.on_segment(seg(PISN + 1, (S1 + 99999) & 0xFFFFFFFF, payload=b"nope"), now=0.1)
    (c,) = out(ep, 0.1)
    assert c.ack == PISN + 1 and ep.read() == b""
    ep.on_segment(seg(PISN + 50, 0, flags=RST), now=0.2)
    assert not ep.reset and len(out(ep, 0.2)) == 1
    ep.on_segment(seg(PISN + 10**6, 0, flags=RST), now=0.3)
    assert not ep.reset and out(ep, 0.3) == []
    ep.on_segment(seg(PISN + 1, 0, flags=RST), now=0.4)
    assert ep.reset and ep.closed


def test_syn_in_established_gets_challenge_ack() -> None:
    ep = established()
    ep.on_segment(seg(PISN + 77, flags=SYN), now=0.1)
    assert [s.flags for s in out(ep, 0.1)] == [ACK]
    assert ep.state is TcpState.ESTABLISHED


def test_abort_sends_rst() -> None:
    ep = established()
    ep.abort(now=0.1)
    (r,) = out(ep, 0.1)
    assert r.flags & RST and r.seq == S1 and ep.closed and ep.reset


def test_peer_closes_first_then_backend() -> None:
    ep = established()
    ep.send(b"resp")
    ep.on_segment(seg(PISN + 1, S1, flags=ACK | FIN, payload=b"req"), now=0.1)
    segs = out(ep, 0.1)
    assert segs[0].payload == b"resp" and segs[0].ack == PISN + 5
    assert ep.read() == b"req" and ep.peer_closed
    ep.send(b"more")                     # we may still send in CLOSE_WAIT
    ep.close(now=0.2)
    (f,) = out(ep, 0.2)
    assert f.payload == b"more" and f.flags & FIN and ep.state is TcpState.LAST_ACK
    ep.on_segment(seg(PISN + 5, (S1 + 9) & 0xFFFFFFFF), now=0.3)
    assert ep.closed and not ep.reset


def test_backend_closes_first_half_close_and_time_wait() -> None:
    ep = established()
    ep.send(b"bye")
    ep.close(now=0.1)
    with pytest.raises(UsageError):
        ep.send(b"x")
    (f,) = out(ep, 0.1)
    assert f.flags & FIN and f.payload == b"bye"
    ep.on_segment(seg(PISN + 1, (S1 + 4) & 0xFFFFFFFF), now=0.2)
    assert ep.state is TcpState.FIN_WAIT_2
    ep.on_segment(seg(PISN + 1, (S1 + 4) & 0xFFFFFFFF, payload=b"still talking"), now=0.3)
    assert ep.read() == b"still talking"
    ep.on_segment(seg(PISN + 14, (S1 + 4) & 0xFFFFFFFF, flags=ACK | FIN), now=0.4)
    (a,) = out(ep, 0.4)
    assert a.ack == PISN + 15 and ep.state is TcpState.TIME_WAIT and ep.peer_closed
    ep.on_segment(seg(PISN + 14, (S1 + 4) & 0xFFFFFFFF, flags=ACK | FIN), now=1.0)
    assert out(ep, 1.0)[0].ack == PISN + 15              # retransmitted FIN re-ACKed
    ep.on_timer(now=1.0 + TIME_WAIT)
    assert ep.closed and not ep.reset


def test_our_fin_retransmitted_when_lost() -> None:
    ep = established()
    ep.close(now=0.1)
    (f,) = out(ep, 0.1)
    d = ep.next_deadline()
    ep.on_timer(now=d)
    (f2,) = out(ep, d)
    assert f2.flags & FIN and f2.seq == f.seq


def test_rst_for_unexpected() -> None:
    syn = build_tcp_packet(A, S, 1234, 80, seq=77, ack=0, flags=SYN, window=100, payload=b"ab")
    ip = parse_ip(syn)
    r = rst_for_unexpected(parse_tcp(syn, ip), ip)
    assert r is not None and verify_checksums(r)
    rs = parse_tcp(r, parse_ip(r))
    assert (rs.flags, rs.seq, rs.ack, rs.sport, rs.dport) == (RST | ACK, 0, 80, 80, 1234)
    data = build_tcp_packet(A, S, 1234, 80, seq=77, ack=999, flags=ACK, window=100)
    rs = parse_tcp(rst_for_unexpected(parse_tcp(data, parse_ip(data)), parse_ip(data)) or b"",
                   parse_ip(rst_for_unexpected(parse_tcp(data, parse_ip(data)),
                                               parse_ip(data)) or b""))
    assert (rs.flags, rs.seq) == (RST, 999)
    rst = build_tcp_packet(A, S, 1234, 80, seq=77, ack=0, flags=RST, window=0)
    assert rst_for_unexpected(parse_tcp(rst, parse_ip(rst)), parse_ip(rst)) is None
