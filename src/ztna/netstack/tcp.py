"""Userspace TCP endpoint (passive side) for one flow: a pure state machine.

Theory of operation. The Agent's OS is the active opener; the App Connector terminates its
TCP connection here and the driver relays the byte stream to a real backend socket.

Inputs:  `on_segment(seg, now=)` for every segment of the flow; the driver's API calls
         `accept`/`refuse` (backend connect result), `send` (backend bytes), `read` (bytes
         for the backend), `close` (backend EOF), `abort`; `on_timer(now=)`.
Outputs: `poll(now=, budget=)` returns up to `budget` complete IP packets; `read()` returns
         in-order peer bytes; `next_deadline()` is the one timer to arm.

Nothing is ever dropped for lack of budget: unsent data and pending ACKs stay queued
(back-pressure). Sequence numbers are kept *absolute* (unwrapped Python ints); a segment's
32-bit numbers are unwrapped against `rcv_nxt`/`snd_una`, so comparisons are plain `<`.

Receiving (RFC 9293 §3.10.7): the acceptability test against the real free buffer space,
RST accepted only at exactly RCV.NXT (RFC 5961 §3; in-window → challenge ACK), SYN in a
synchronized state → challenge ACK, ACKs beyond SND.MAX → challenge ACK, old ACKs ignored.
Data is reassembled by `ReceiveBuffer` (each byte once, in order, data on SYN/FIN kept).
The advertised window is the free buffer space, scaled; reads that move the right edge by
min(buffer/2, 2·MSS) send a window update. ACKs: immediate for small, out-of-order or
gap-filling segments (up to 3 duplicate ACKs queued so the peer can fast-retransmit),
delayed ≤ 40 ms for a single full-sized segment.

Sending: within min(peer window, cwnd), MSS = min(ours, peer's). RFC 6298 RTO with Karn,
backoff, go-back to SND.UNA on timeout (what goes out again is never held back by sender SWS
avoidance, and the oldest segment goes even into a shut window: it is the probe); fast
retransmit on 3 duplicate ACKs with NewReno recovery (RFC 6582), limited transmit (RFC 3042);
initial cwnd 10 segments (RFC 6928).
SACK (RFC 2018) when the peer's SYN offers it: its blocks feed a scoreboard
(`ztna.netstack.sack`); recovery starts on 3 duplicate ACKs or > 2 segments SACKed, and
then retransmits every hole once, in order, while the estimated flight ("pipe",
RFC 6675) is below cwnd = ssthresh — so a window with several losses recovers in one
round trip instead of one hole per RTT. After a timeout the go-back resend skips SACKed
ranges (a second timeout in a row forgets them: the peer may have reneged). A hole whose
retransmission is overtaken by SACKed later data is resent again (RACK idea); a small
flight uses a lower threshold (early retransmit, RFC 5827); a tail loss probe (RFC 8985
§7: the last segment again after 2·SRTT) turns a lost tail into a fast recovery. We send SACK
blocks ourselves while holding out-of-order data (3 on a bare ACK, 1 on a data segment,
which fits the 12-byte options margin of the MSS). A persist timer probes a zero
window (and forces out a small window that SWS avoidance held back). After
`MAX_RETRIES` timeouts without progress the flow is reset.

Closing follows `_TRANSITIONS`, one table for both orders (defects 25–26): peer FIN first →
CLOSE_WAIT, `close()` → LAST_ACK; `close()` first → FIN_WAIT_1 after all data, peer data
still received (half-close), their FIN ACKed → TIME_WAIT (short: the flow key is unique).
"""

from __future__ import annotations

import enum
from typing import Final

from ztna.errors import UsageError
from ztna.netstack.packets import (
    ACK,
    FIN,
    RST,
    SYN,
    IpHeader,
    TcpSegment,
    build_tcp_packet,
)
from ztna.netstack.reassembly import ReceiveBuffer
from ztna.netstack.rtt import RttEstimator
from ztna.netstack.sack import SackScoreboard, receiver_blocks

__all__ = ["TcpEndpoint", "TcpState", "rst_for_unexpected", "MAX_RETRIES", "TIME_WAIT"]

MAX_RETRIES: Final = 8            # consecutive RTO expiries without progress → reset
MAX_PERSIST_PROBES: Final = 12    # unanswered zero-window probes → reset
TIME_WAIT: Final = 2.0            # seconds; flow keys are unique, 2·MSL is not needed
DELAYED_ACK: Final = 0.04         # seconds (Linux's minimum delayed ACK)
INITIAL_WINDOW_SEGMENTS: Final = 10   # RFC 6928
DEFAULT_MSS_V4: Final = 536       # RFC 9293 §3.7.1 when the SYN carries no MSS option
DEFAULT_MSS_V6: Final = 1220      # RFC 8200 §8.3
_MASK: Final = 0xFFFFFFFF


class TcpState(enum.Enum):
    LISTEN = "LISTEN"                # created, SYN not yet seen
    SYN_RECEIVED = "SYN_RECEIVED"    # SYN seen; SYN-ACK only after accept()
    ESTABLISHED = "ESTABLISHED"
    CLOSE_WAIT = "CLOSE_WAIT"        # peer sent FIN
    LAST_ACK = "LAST_ACK"
    FIN_WAIT_1 = "FIN_WAIT_1"        # we closed (backend EOF)
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSING = "CLOSING"
    TIME_WAIT = "TIME_WAIT"
    CLOSED = "CLOSED"


class _Input(enum.Enum):
    HANDSHAKE_ACKED = "HANDSHAKE_ACKED"
    CLOSE = "CLOSE"
    FIN_IN = "FIN_IN"
    FIN_ACKED = "FIN_ACKED"


S = TcpState
# The close/handshake state table. A pair not listed leaves the state unchanged.
_TRANSITIONS: Final[dict[tuple[TcpState, _Input], TcpState]] = {
    (S.SYN_RECEIVED, _Input.HANDSHAKE_ACKED): S.ESTABLISHED,
    (S.ESTABLISHED, _Input.CLOSE): S.FIN_WAIT_1,
    (S.CLOSE_WAIT, _Input.CLOSE): S.LAST_ACK,
    (S.ESTABLISHED, _Input.FIN_IN): S.CLOSE_WAIT,
    (S.FIN_WAIT_1, _Input.FIN_IN): S.CLOSING,
    (S.FIN_WAIT_2, _Input.FIN_IN): S.TIME_WAIT,
    (S.FIN_WAIT_1, _Input.FIN_ACKED): S.FIN_WAIT_2,
    (S.CLOSING, _Input.FIN_ACKED): S.TIME_WAIT,
    (S.LAST_ACK, _Input.FIN_ACKED): S.CLOSED,
}
_SENDING_STATES: Final = frozenset({S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING,
                                    S.LAST_ACK})
_RECEIVING_STATES: Final = frozenset({S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2})


def _unwrap(value: int, ref: int) -> int:
    """The absolute number nearest `ref` whose low 32 bits are `value`."""
    return ref + ((value - ref + 0x80000000) & _MASK) - 0x80000000


def rst_for_unexpected(seg: TcpSegment, ip: IpHeader) -> bytes | None:
    """RFC 9293 §3.10.7.1 reset for a segment of no known flow; None for a RST (never answered)."""
    if seg.flags & RST:
        return None
    if seg.flags & ACK:
        seq, ack, flags = seg.ack, 0, RST
    else:
        seq, ack, flags = 0, seg.seq + seg.seg_len, RST | ACK
    return build_tcp_packet(ip.dst, ip.src, seg.dport, seg.sport, seq=seq, ack=ack, flags=flags,
                            window=0)


class TcpEndpoint:
    def __init__(self, *, local_ip: bytes, local_port: int, remote_ip: bytes, remote_port: int,
                 isn: int, mss: int, now: float, recv_buffer: int = 256 * 1024,
                 send_buffer: int = 256 * 1024) -> None:
        if mss < 64 or recv_buffer < mss or send_buffer < mss:
            raise UsageError("mss must be >= 64 and buffers at least one MSS")
        self._ips = (local_ip, remote_ip)
        self._ports = (local_port, remote_port)
        self._mss = mss                  # what we advertise and the most we send
        self._smss = mss                 # effective send MSS after the peer's SYN
        self._recv_capacity = recv_buffer
        self._send_capacity = send_buffer
        self.state = TcpState.LISTEN
        self.established = False         # the three-way handshake completed (stays True)
        self.reset = False               # a RST was received or sent
        self._accepted = False
        self._created = now
        # send side (absolute sequence numbers)
        self._iss = isn & _MASK
        self._snd_una = self._snd_nxt = self._snd_max = self._iss
        self._sndbuf = bytearray()
        self._sndbuf_seq = self._iss + 1     # sequence number of _sndbuf[0]
        self._fin_seq: int | None = None     # our FIN's sequence number once close() is called
        self._snd_wnd = 0
        self._max_snd_wnd = 0
        self._snd_wl1 = self._snd_wl2 = 0
        self._snd_shift = self._rcv_shift = 0
        self._wscale_ok = False
        self._rtt = RttEstimator()
        self._rtt_seq: int | None = None
        self._rtt_time = 0.0
        self._cwnd = INITIAL_WINDOW_SEGMENTS * mss
        self._ssthresh = 1 << 30
        self._dupacks = 0
        self._in_recovery = False
        self._recover = self._iss
        self._rtx_at: int | None = None      # one fast retransmission pending from here
        self._retries = 0
        self._persist_probes = 0
        self._sack_ok = False                # both sides offered SACK-permitted
        self._sb = SackScoreboard()
        self._rtx_high = self._iss           # HighRxt: holes below it were resent this recovery
        self._rtx_log: list[tuple[int, int]] = []   # (hole start, SND.MAX when resent)
        self._last_ooo: int | None = None    # seq of the latest out-of-order segment received
        # receive side
        self._irs = 0
        self._rcv = ReceiveBuffer(0, recv_buffer)
        self._adv_edge = 0
        self._fin_in_applied = False
        self._close_pending = False
        # output flags and timers
        self._synack_pending = False
        self._force_send = False         # persist timer fired: probe / override SWS
        self._acks_due = 0
        self._rst_out: bytes | None = None
        self._rst_closes = False
        self._ack_deadline: float | None = None
        self._rto_deadline: float | None = None
        self._tlp_deadline: float | None = None   # tail loss probe (RFC 8985 §7), once per flight
        self._persist_deadline: float | None = None
        self._timewait_deadline: float | None = None

    # ------------------------------------------------------------------ properties
    @property
    def closed(self) -> bool:
        """Fully done: the driver may delete the flow (a queued RST has been polled out)."""
        return self.state is TcpState.CLOSED and self._rst_out is None

    @property
    def peer_closed(self) -> bool:
        """The peer's FIN arrived and every byte before it has been read (EOF)."""
        return self._rcv.fin_received and self._rcv.unread == 0

    @property
    def readable(self) -> int:
        """In-order peer bytes waiting for `read()`."""
        return self._rcv.unread

    @property
    def rto(self) -> float:
        return self._rtt.rto

    # ------------------------------------------------------------------ driver API
    def accept(self, *, now: float) -> None:
        if self.state is TcpState.LISTEN:
            raise UsageError("accept() before the SYN was fed")
        if self.state is TcpState.SYN_RECEIVED and not self._accepted:
            self._accepted = True
            self._synack_pending = True

    def refuse(self, *, now: float) -> None:
        if self.state is TcpState.SYN_RECEIVED and not self._accepted:
            self._queue_rst(seq=0, ack=self._rcv.rcv_nxt, flags=RST | ACK, closes=True)
            self._enter_closed(reset=True)
        else:
            self.abort(now=now)

    def abort(self, *, now: float) -> None:
        if self.state is TcpState.CLOSED:
            return
        if self.state is TcpState.SYN_RECEIVED and not self._accepted:
            self.refuse(now=now)
            return
        if self.state not in (TcpState.LISTEN, TcpState.TIME_WAIT):
            self._queue_rst(seq=self._snd_max, ack=self._rcv.rcv_nxt, flags=RST | ACK,
                            closes=True)
        self._enter_closed(reset=True)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self._fin_seq is not None:
            raise UsageError("send() after close()")
        if self.state is TcpState.CLOSED:
            return 0
        n = min(len(data), self.send_space())
        self._sndbuf += memoryview(data)[:n]
        return n

    def send_space(self) -> int:
        if self.state is TcpState.CLOSED or self._fin_seq is not None:
            return 0
        return self._send_capacity - len(self._sndbuf)

    def read(self, max_bytes: int = -1) -> bytes:
        out = self._rcv.read(max_bytes)
        if out and self.state in _RECEIVING_STATES:
            # Receiver SWS avoidance (RFC 9293 §3.8.6.2.2): announce only a real gain.
            gain = self._rcv.rcv_nxt + self._rcv.window() - self._adv_edge
            if gain >= min(self._recv_capacity // 2, 2 * self._mss):
                self._acks_due = max(self._acks_due, 1)
        return out

    def close(self, *, now: float) -> None:
        if self._fin_seq is not None or self.state is TcpState.CLOSED:
            return
        if self.state is TcpState.LISTEN or (self.state is TcpState.SYN_RECEIVED
                                             and not self._accepted):
            self.refuse(now=now)
            return
        self._fin_seq = self._sndbuf_seq + len(self._sndbuf)
        if self.state is TcpState.SYN_RECEIVED:
            self._close_pending = True       # FIN follows once the handshake completes
        else:
            self._transition(_Input.CLOSE, now)

    def set_mss(self, mss: int) -> None:
        """Lower (or raise, up to the negotiated value) the send MSS, e.g. on a DATAGRAM size change."""
        self._mss = max(64, mss)
        self._smss = min(self._smss, self._mss) if self.established else self._mss

    # ------------------------------------------------------------------ timers
    def path_changed(self, *, now: float) -> None:
        """The flow's segments take another path from now on (the relay came back after an
        outage, or the flow moved between relay and direct). The timeouts counted while the
        old path was dead say nothing about the new one: drop their backoff and retry count,
        and resend what is unacknowledged (or probe a shut window) now rather than at a
        backed-off deadline that may be tens of seconds away."""
        self._rtt.progress()
        self._retries = 0
        if self._rto_deadline is not None:
            self._rto_deadline = now
        if self._persist_deadline is not None:
            self._persist_probes = 0
            self._persist_deadline = now

    def next_deadline(self) -> float | None:
        times = [t for t in (self._ack_deadline, self._rto_deadline, self._tlp_deadline,
                             self._persist_deadline,
                             self._timewait_deadline) if t is not None]
        return min(times) if times else None

    def on_timer(self, *, now: float) -> None:
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_deadline = None
            self._acks_due = max(self._acks_due, 1)
        if self._timewait_deadline is not None and now >= self._timewait_deadline:
            self._enter_closed(reset=False)
            return
        if self._tlp_deadline is not None and now >= self._tlp_deadline:
            self._tlp_deadline = None
            if self._snd_max > self._snd_una and not self._in_recovery \
                    and self.state in _SENDING_STATES and self._rtx_at is None:
                # Resend the last segment: its SACK / duplicate ACK starts a fast recovery
                # where a lost tail would otherwise wait for the RTO.
                self._rtx_at = max(self._snd_una, self._snd_max - self._smss)
                self._rtt_seq = None
        if self._rto_deadline is not None and now >= self._rto_deadline:
            self._on_rto(now)
        if self._persist_deadline is not None and now >= self._persist_deadline:
            self._persist_deadline = None
            self._persist_probes += 1
            if self._persist_probes > MAX_PERSIST_PROBES:
                self.abort(now=now)
                return
            self._force_send = True

    def _on_rto(self, now: float) -> None:
        self._retries += 1
        if self._retries > MAX_RETRIES:
            self.abort(now=now)
            return
        self._rtt.backoff()
        self._rtt_seq = None                 # Karn: no sample from a retransmitted segment
        if self.state is TcpState.SYN_RECEIVED:
            self._synack_pending = True
        else:
            flight = self._snd_max - self._snd_una
            self._ssthresh = max(flight // 2, 2 * self._smss)
            self._cwnd = self._smss
            self._in_recovery = False
            self._dupacks = 0
            self._recover = self._snd_max
            self._rtx_at = None
            self._snd_nxt = self._snd_una    # go back: resend from the oldest unacked byte
            if self._retries > 1:
                self._sb.clear()             # RFC 2018 §8: the peer may have reneged
        self._rto_deadline = now + self._rtt.rto

    # ------------------------------------------------------------------ input
    def on_segment(self, seg: TcpSegment, *, now: float) -> None:
        state = self.state
        if state is TcpState.CLOSED:
            return
        if state is TcpState.LISTEN:
            self._on_syn(seg)
            return
        flags = seg.flags
        rcv = self._rcv
        seq = _unwrap(seg.seq, rcv.rcv_nxt)
        if flags & SYN and not flags & RST:
            if state is TcpState.SYN_RECEIVED and seq == self._irs and not flags & ACK:
                # Retransmitted SYN: absorbed before accept(), answered after it.
                if self._accepted:
                    self._synack_pending = True
                return
            self._ack_now()                  # RFC 5961 §4.2: challenge ACK, drop
            return
        if not self._acceptable(seq, seg.seg_len):
            if flags & RST:
                return
            if rcv.window() == 0 and seq == rcv.rcv_nxt and flags & ACK:
                self._process_ack(seg, seq, now)   # zero window: still take the ACK
            self._ack_now()
            if state is TcpState.TIME_WAIT and flags & FIN:
                self._timewait_deadline = now + TIME_WAIT
            return
        self._persist_probes = 0             # the peer is alive
        if flags & RST:
            if seq == rcv.rcv_nxt:
                self._enter_closed(reset=True)
            else:
                self._ack_now()              # RFC 5961 §3.2: challenge ACK
            return
        if not flags & ACK:
            return
        if state is TcpState.SYN_RECEIVED:
            if not self._accepted:
                return
            ack = _unwrap(seg.ack, self._snd_una)
            if not self._snd_una < ack <= self._snd_max:
                self._queue_rst(seq=seg.ack, ack=0, flags=RST, closes=False)
                return
            self.established = True
            self._snd_wl1 = seq - 1          # force the window update below
            self._transition(_Input.HANDSHAKE_ACKED, now)
            if self._close_pending:
                self._transition(_Input.CLOSE, now)
        if not self._process_ack(seg, seq, now):
            return
        if self.state in _RECEIVING_STATES and (seg.payload or flags & FIN):
            self._receive(seq, seg, now)
        elif seg.payload or flags & FIN:
            self._ack_now()                  # e.g. a retransmitted FIN in CLOSE_WAIT
        self._sync_fin_in(now)

    def _on_syn(self, seg: TcpSegment) -> None:
        if not seg.flags & SYN or seg.flags & (ACK | RST):
            return
        self._irs = seg.seq
        self._rcv = ReceiveBuffer(seg.seq + 1, self._recv_capacity)
        default = DEFAULT_MSS_V4 if len(self._ips[0]) == 4 else DEFAULT_MSS_V6
        self._smss = min(self._mss, seg.mss or default)
        self._cwnd = INITIAL_WINDOW_SEGMENTS * self._smss
        if seg.wscale is not None:           # RFC 7323: scale only if both sides offer it
            self._wscale_ok = True
            self._snd_shift = seg.wscale
            shift = 0
            while (self._recv_capacity >> shift) > 0xFFFF and shift < 14:
                shift += 1
            self._rcv_shift = shift
        self._sack_ok = seg.sack_permitted
        self._snd_wnd = self._max_snd_wnd = seg.window   # never scaled in a SYN
        self._snd_wl1, self._snd_wl2 = seg.seq, self._iss
        self.state = TcpState.SYN_RECEIVED
        if seg.payload or seg.flags & FIN:   # data on the SYN is kept
            self._rcv.insert(seg.seq + 1, seg.payload, bool(seg.flags & FIN))

    def _acceptable(self, seq: int, seg_len: int) -> bool:
        """RFC 9293 §3.10.7.4 table, against the real free buffer space."""
        nxt = self._rcv.rcv_nxt
        wnd = self._rcv.window()
        if seg_len == 0:
            return seq == nxt if wnd == 0 else nxt <= seq < nxt + wnd
        if wnd == 0:
            return False
        end = seq + seg_len - 1
        return nxt <= seq < nxt + wnd or nxt <= end < nxt + wnd

    def _process_ack(self, seg: TcpSegment, seq: int, now: float) -> bool:
        ack = _unwrap(seg.ack, self._snd_una)
        if ack > self._snd_max:
            self._ack_now()                  # RFC 5961 §5.2: ACK of unsent data
            return False
        if ack < self._snd_una - max(self._max_snd_wnd, 0xFFFF):
            self._ack_now()
            return False
        window_changed = False
        if seq > self._snd_wl1 or (seq == self._snd_wl1 and ack >= self._snd_wl2):
            wnd = seg.window << self._snd_shift
            window_changed = wnd != self._snd_wnd
            self._snd_wnd, self._snd_wl1, self._snd_wl2 = wnd, seq, ack
            self._max_snd_wnd = max(self._max_snd_wnd, wnd)
            if wnd and window_changed:
                self._persist_deadline = None
        if self._sack_ok and seg.sack_blocks:
            una = self._snd_una
            self._sb.update(((_unwrap(left, una), _unwrap(right, una))
                             for left, right in seg.sack_blocks), max(ack, una), self._snd_max)
            if self._rtx_log:
                self._detect_lost_retransmissions(max(ack, una))
        if ack > self._snd_una:
            self._on_new_ack(ack, now)
        elif (ack == self._snd_una and not seg.payload and not seg.flags & (SYN | FIN)
              and self._snd_max > self._snd_una and not window_changed):
            self._on_dupack()
        return True

    def _on_new_ack(self, ack: int, now: float) -> None:
        acked = ack - self._snd_una
        if self._rtt_seq is not None and ack >= self._rtt_seq:
            self._rtt.sample(now - self._rtt_time)
            self._rtt_seq = None
        data_end = self._sndbuf_seq + len(self._sndbuf)
        n = min(ack, data_end) - self._sndbuf_seq
        if n > 0:
            del self._sndbuf[:n]
            self._sndbuf_seq += n
        self._snd_una = ack
        self._snd_nxt = max(self._snd_nxt, ack)
        self._sb.advance(ack)
        self._rtx_high = max(self._rtx_high, ack)
        if self._rtx_at is not None and self._rtx_at < ack:
            self._rtx_at = None
        if self._in_recovery:
            if ack >= self._recover:         # full ACK: leave recovery (RFC 6582 §3.2 step 3)
                self._in_recovery = False
                self._cwnd = min(self._ssthresh, self._snd_max - ack + self._smss)
            elif not self._sack_ok:          # partial ACK: retransmit the next hole, deflate
                self._rtx_at = ack
                self._cwnd = max(self._cwnd - acked + self._smss, self._smss)
        elif self._cwnd < self._ssthresh:
            self._cwnd += min(acked, 2 * self._smss)     # RFC 3465, L = 2·SMSS
        else:
            self._cwnd += max(1, self._smss * self._smss // self._cwnd)
        self._dupacks = 0
        self._retries = 0
        self._rtt.progress()
        self._rto_deadline = now + self._rtt.rto if self._snd_max > ack else None
        self._arm_tlp(now)
        if self._fin_seq is not None and ack > self._fin_seq:
            self._transition(_Input.FIN_ACKED, now)

    def _on_dupack(self) -> None:
        self._dupacks += 1
        if self._in_recovery:
            if not self._sack_ok:
                self._cwnd += self._smss     # each dup ACK: a segment left the network
        elif (self._dupacks == 3 or (self._sack_ok and self._sb.sacked >= self._dupthresh())) \
                and self._snd_una >= self._recover:
            flight = self._snd_max - self._snd_una
            # SACK peers: CUBIC's β = 0.7 (RFC 9438 §4.6) — the QUIC connection underneath
            # already backs off on the same losses; halving twice starved lossy paths.
            self._ssthresh = max((flight * 7 // 10 if self._sack_ok else flight // 2), 2 * self._smss)
            self._in_recovery = True
            self._recover = self._snd_max
            self._rtt_seq = None
            if self._sack_ok:                # the pipe estimate replaces window inflation
                self._cwnd = self._ssthresh
                self._rtx_high = self._snd_una
                self._rtx_log.clear()
            else:
                self._cwnd = self._ssthresh + 3 * self._smss
                self._rtx_at = self._snd_una

    def _dupthresh(self) -> int:
        """SACKed bytes that declare the first hole lost: 3 segments, fewer when fewer are
        outstanding (early retransmit, RFC 5827) — a small window has no 3 to report."""
        smss = self._smss
        outstanding = -(-(self._snd_max - self._snd_una) // smss)
        return min(2 * smss + 1, max(1, (outstanding - 1) * smss - smss + 1))

    def _detect_lost_retransmissions(self, una: int) -> None:
        """A hole still open although data sent *after* its retransmission was SACKed:
        the retransmission was lost too (no reordering inside the tunnel) — resend it now
        instead of waiting for the RTO (the idea of RACK, RFC 8985, by sequence order)."""
        high = self._sb.high
        keep = []
        for start, mark in self._rtx_log:
            if start < una:
                continue
            if high > mark and (hole := self._sb.hole_at(start)) is not None and hole[0] == start:
                self._rtx_high = min(self._rtx_high, start)
            else:
                keep.append((start, mark))
        self._rtx_log = keep

    def _pipe(self) -> int:
        """RFC 6675 §4 estimate of the bytes in flight during SACK recovery: everything
        above the highest SACK, plus the holes below it that were already resent."""
        una = self._snd_una
        high = max(self._sb.high, una)
        resent_to = min(self._rtx_high, high)
        resent = resent_to - una - self._sb.sacked_between(una, resent_to) if resent_to > una else 0
        return self._snd_max - high + resent

    def _receive(self, seq: int, seg: TcpSegment, now: float) -> None:
        rcv = self._rcv
        had_gaps = rcv.has_gaps
        advanced = rcv.insert(seq, seg.payload, bool(seg.flags & FIN))
        if seq > rcv.rcv_nxt and seg.payload:
            self._last_ooo = seq
        if had_gaps or rcv.has_gaps or advanced == 0:
            # Out of order, filling a gap, or a duplicate: ACK now, one per segment (≤ 3),
            # so the peer sees the duplicate ACKs fast retransmit needs (RFC 5681 §4.2).
            self._acks_due = min(self._acks_due + 1, 3)
            self._ack_deadline = None
        elif len(seg.payload) >= self._mss and self._ack_deadline is None and not rcv.fin_received:
            self._ack_deadline = now + DELAYED_ACK   # every second full segment is ACKed
        else:
            self._ack_now()

    def _sync_fin_in(self, now: float) -> None:
        if self._rcv.fin_received and not self._fin_in_applied and self.established:
            self._fin_in_applied = True
            self._ack_now()
            self._transition(_Input.FIN_IN, now)

    # ------------------------------------------------------------------ state changes
    def _transition(self, event: _Input, now: float) -> None:
        new = _TRANSITIONS.get((self.state, event))
        if new is None:
            return
        self.state = new
        if new is TcpState.TIME_WAIT:
            self._rto_deadline = self._persist_deadline = self._tlp_deadline = None
            self._timewait_deadline = now + TIME_WAIT
        elif new is TcpState.CLOSED:
            self._enter_closed(reset=False)

    def _enter_closed(self, *, reset: bool) -> None:
        self.state = TcpState.CLOSED
        self.reset = self.reset or reset
        self._ack_deadline = self._rto_deadline = self._tlp_deadline = None
        self._persist_deadline = self._timewait_deadline = None
        self._acks_due = 0
        self._synack_pending = False

    def _ack_now(self) -> None:
        self._acks_due = max(self._acks_due, 1)
        self._ack_deadline = None

    def _queue_rst(self, *, seq: int, ack: int, flags: int, closes: bool) -> None:
        local_ip, remote_ip = self._ips
        self._rst_out = build_tcp_packet(local_ip, remote_ip, *self._ports, seq=seq, ack=ack,
                                         flags=flags, window=0)
        self._rst_closes = closes

    # ------------------------------------------------------------------ output
    def poll(self, *, now: float, budget: int) -> list[bytes]:
        out: list[bytes] = []
        if budget <= 0:
            return out
        if self._rst_out is not None:
            out.append(self._rst_out)
            self._rst_out = None
            return out
        if self.state is TcpState.CLOSED or self.state is TcpState.LISTEN:
            return out
        if self._synack_pending:
            self._synack_pending = False
            out.append(self._synack(now))
        if self.state in _SENDING_STATES:
            if self._rtx_at is not None and len(out) < budget:
                out.append(self._retransmit_one(now))
            while len(out) < budget:
                pkt = self._sack_retransmit(now) if self._in_recovery and self._sack_ok \
                    else None
                if pkt is None:
                    pkt = self._next_segment(now)
                if pkt is None:
                    break
                out.append(pkt)
            self._arm_persist(now)
        if out and self.state is not TcpState.SYN_RECEIVED:
            self._acks_due = 0               # every segment we sent carried the ACK
            self._ack_deadline = None
        while self._acks_due and len(out) < budget:
            self._acks_due -= 1
            out.append(self._segment(self._snd_nxt, ACK, b""))
        self._force_send = False
        return out

    def _synack(self, now: float) -> bytes:
        self._snd_nxt = max(self._snd_nxt, self._iss + 1)
        if self._snd_max <= self._iss:
            self._snd_max = self._iss + 1
            self._rtt_seq, self._rtt_time = self._iss + 1, now
        else:
            self._rtt_seq = None             # Karn: a retransmitted SYN-ACK is not timed
        wscale = self._rcv_shift if self._wscale_ok else None
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rtt.rto
            self._arm_tlp(now)
        window = min(self._rcv.window(), 0xFFFF)      # a SYN's window is never scaled
        self._adv_edge = self._rcv.rcv_nxt + window
        local_ip, remote_ip = self._ips
        return build_tcp_packet(local_ip, remote_ip, *self._ports, seq=self._iss,
                                ack=self._rcv.rcv_nxt, flags=SYN | ACK, window=window,
                                mss=self._mss, wscale=wscale, sack_permitted=self._sack_ok)

    def _segment(self, seq: int, flags: int, payload: bytes | bytearray | memoryview) -> bytes:
        window = min(self._rcv.window() >> self._rcv_shift, 0xFFFF)
        self._adv_edge = self._rcv.rcv_nxt + (window << self._rcv_shift)
        local_ip, remote_ip = self._ips
        blocks: tuple[tuple[int, int], ...] = ()
        if self._sack_ok and self._rcv.has_gaps:
            blocks = receiver_blocks(self._rcv.ooo_ranges(), self._last_ooo,
                                     1 if payload else 3)
        return build_tcp_packet(local_ip, remote_ip, *self._ports, seq=seq,
                                ack=self._rcv.rcv_nxt, flags=flags | ACK, window=window,
                                payload=payload, sack_blocks=blocks)

    def _payload_at(self, seq: int, length: int) -> memoryview:
        off = seq - self._sndbuf_seq
        return memoryview(self._sndbuf)[off:off + length]

    def _data_end(self) -> int:
        return self._sndbuf_seq + len(self._sndbuf)

    def _retransmit_one(self, now: float) -> bytes:
        seq = self._rtx_at
        assert seq is not None
        self._rtx_at = None
        length = max(0, min(self._smss, self._data_end() - seq, self._snd_max - seq))
        flags = FIN if self._fin_seq is not None and seq + length == self._fin_seq \
            and self._snd_max > self._fin_seq else 0
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rtt.rto
            self._arm_tlp(now)
        with self._payload_at(seq, length) as payload:
            return self._segment(seq, flags, payload)

    def _sack_retransmit(self, now: float) -> bytes | None:
        """During SACK recovery: the next hole not yet resent, if the pipe has room."""
        if self._pipe() + self._smss > self._cwnd:
            return None
        hole = self._sb.hole_at(max(self._rtx_high, self._snd_una))
        if hole is None:
            return None
        start = hole[0]
        length = min(self._smss, hole[1] - start, self._data_end() - start)
        if length <= 0:
            return None
        self._rtx_high = start + length
        if len(self._rtx_log) < 256:
            self._rtx_log.append((start, self._snd_max))
        self._rtt_seq = None                 # Karn
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rtt.rto
            self._arm_tlp(now)
        with self._payload_at(start, length) as payload:
            return self._segment(start, 0, payload)

    def _next_segment(self, now: float) -> bytes | None:
        nxt = self._snd_nxt
        sb = self._sb
        hole_end = None
        if sb and nxt < sb.high:             # go-back after a timeout: skip what was SACKed
            hole = sb.hole_at(nxt)
            if hole is not None:
                nxt, hole_end = hole
            else:
                nxt = sb.high
            self._snd_nxt = nxt
        avail = self._data_end() - nxt
        fin_due = self._fin_seq is not None and nxt + max(avail, 0) == self._fin_seq
        wnd_room = self._snd_una + self._snd_wnd - nxt
        if self._in_recovery and self._sack_ok:
            cwnd_room = self._cwnd - self._pipe()
        elif self._sack_ok:
            cwnd_room = self._cwnd - (nxt - self._snd_una - sb.sacked_between(self._snd_una, nxt))
        else:                                # + limited transmit (RFC 3042)
            cwnd_room = self._snd_una + self._cwnd - nxt
            if not self._in_recovery:
                cwnd_room += min(self._dupacks, 2) * self._smss
        limit = min(wnd_room, cwnd_room)
        if hole_end is not None:
            limit = min(limit, hole_end - nxt)
        # Bytes below SND.MAX went out once already (we are going back after a timeout).
        resending = nxt < self._snd_max
        if resending and nxt == self._snd_una and self._retries and wnd_room <= 0:
            # The oldest unacknowledged segment after a timeout goes out even into a shut
            # window, as Linux does: it is the probe that gets the peer's current window.
            # Persist probes only run with nothing in flight, so nothing else would ask.
            limit = min(self._snd_max - nxt, cwnd_room)
        length = max(0, min(avail, self._smss, limit))
        if self._force_send and length == 0 and avail > 0:
            # Persist timer: probe a zero window with an old sequence number (as Linux
            # does), which the peer must answer with an ACK carrying its window.
            self._force_send = False
            return self._segment(self._snd_una - 1, 0, b"")
        if length < avail and length < self._smss and length < self._max_snd_wnd // 2 \
                and not self._force_send and not resending:
            # Sender SWS avoidance (RFC 9293 §3.8.6.2.1) holds back only new data. A lost
            # small segment (a persist timer forced it into a small window) must be resent
            # as it was: holding it back waits for an ACK the peer has no reason to send —
            # its window update is not retransmitted — and the flow stalls until the reset.
            return None
        if length == 0 and not fin_due:
            return None
        self._force_send = False             # one forced segment per persist expiry
        fin = FIN if fin_due and length == avail else 0
        end = nxt + length + (1 if fin else 0)
        if nxt < self._snd_max:
            self._rtt_seq = None             # Karn: a retransmission is never timed
        elif self._rtt_seq is None:
            self._rtt_seq, self._rtt_time = end, now
        with self._payload_at(nxt, length) as payload:
            pkt = self._segment(nxt, fin, payload)
        self._snd_nxt = end
        self._snd_max = max(self._snd_max, end)
        if self._rto_deadline is None:
            self._rto_deadline = now + self._rtt.rto
            self._arm_tlp(now)
        return pkt

    def _arm_tlp(self, now: float) -> None:
        srtt = self._rtt.srtt
        if srtt is None or not self._sack_ok or self._in_recovery or \
                self._snd_max <= self._snd_una or \
                self._rto_deadline is None:
            self._tlp_deadline = None
            return
        # 2·SRTT, plus the peer's delayed-ACK allowance when one segment is in flight.
        pto = max(2 * srtt, 0.01) + (DELAYED_ACK if self._snd_max - self._snd_una <= self._smss
                                     else 0.0)
        at = now + pto
        self._tlp_deadline = at if at < self._rto_deadline else None

    def _arm_persist(self, now: float) -> None:
        pending = self._data_end() > self._snd_nxt
        if pending and self._snd_max == self._snd_una and self._persist_deadline is None:
            backoff = min(self._rtt.rto * (1 << min(self._persist_probes, 6)), 60.0)
            self._persist_deadline = now + backoff
        elif not pending or self._snd_max > self._snd_una:
            self._persist_deadline = None
