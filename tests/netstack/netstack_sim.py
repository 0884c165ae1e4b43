"""Test-side helpers: a minimal active TCP peer (the "Agent's OS") and a lossy simulated link.

The peer is deliberately simple and independent of ztna.netstack.tcp: go-back-N sending
with a fixed 0.3 s retransmission timer and fast go-back on 3 duplicate ACKs, and an
in-order-only receiver that ACKs every segment (duplicate ACKs for anything out of order).
With `sack=True` it offers SACK-permitted, keeps out-of-order segments and reports them in
SACK blocks (most recent first, up to 3), skips what the endpoint SACKed when it goes back,
and counts `spurious` payload bytes: retransmissions of data it already held.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ztna.netstack.packets import (
    ACK,
    FIN,
    RST,
    SYN,
    build_tcp_packet,
    parse_ip,
    parse_tcp,
    verify_checksums,
)
from ztna.netstack.tcp import TcpEndpoint

M = 0xFFFFFFFF


class Peer:
    def __init__(self, *, ip: bytes, port: int, server_ip: bytes, server_port: int,
                 isn: int = 1000, mss: int = 1200, wscale: int | None = 7,
                 rcv_wnd: int = 1 << 20, data: bytes = b"", sack: bool = False) -> None:
        self.sack = sack
        self.ooo: dict[int, bytes] = {}
        self.latest_ooo: int | None = None
        self.spurious = 0
        self.sacked: set[int] = set()    # our segment starts the endpoint SACKed
        self.ip, self.port, self.sip, self.sport = ip, port, server_ip, server_port
        self.iss, self.mss, self.wscale, self.rcv_wnd = isn, mss, wscale, rcv_wnd
        self.data = data                 # everything we will send
        self.snd_una = self.snd_nxt = isn + 1
        self.state = "SYN_SENT"
        self.rcv_nxt = 0
        self.received = bytearray()
        self.fin_received = False
        self.want_fin = False
        self.fin_acked = False
        self.reset = False
        self.snd_wnd = 0
        self.shift = 0
        self.peer_mss = 536
        self.ack_due = 0
        self.last_progress = 0.0
        self.syn_sent_at: float | None = None
        self.dupacks = 0
        self.segments_seen: list = []

    @property
    def fin_seq(self) -> int:
        return self.iss + 1 + len(self.data)

    def _blocks(self) -> tuple[tuple[int, int], ...]:
        if not (self.sack and self.ooo):
            return ()
        ranges: list[list[int]] = []
        for start in sorted(self.ooo):
            end = start + len(self.ooo[start])
            if ranges and ranges[-1][1] >= start:
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([start, end])
        first = [r for r in ranges if self.latest_ooo is not None
                 and r[0] <= self.latest_ooo < r[1]]
        rest = [r for r in reversed(ranges) if r not in first]
        return tuple((a & M, b & M) for a, b in (first + rest)[:3])

    def _pkt(self, seq: int, flags: int, payload: bytes = b"", **opts: object) -> bytes:
        if "mss" not in opts and not payload:
            opts["sack_blocks"] = self._blocks()
        wnd = self.rcv_wnd if "mss" in opts else self.rcv_wnd >> (self.wscale or 0)
        return build_tcp_packet(self.ip, self.sip, self.port, self.sport, seq=seq & M,
                                ack=self.rcv_nxt & M, flags=flags,
                                window=min(wnd, 0xFFFF), payload=payload, **opts)

    def on_packet(self, pkt: bytes, now: float) -> None:
        assert verify_checksums(pkt)
        ip = parse_ip(pkt)
        seg = parse_tcp(pkt, ip)
        self.segments_seen.append(seg)
        assert len(seg.payload) <= self.mss
        if seg.flags & RST:
            self.reset = True
            return
        if self.state == "SYN_SENT":
            if seg.flags & SYN and seg.flags & ACK and seg.ack == (self.iss + 1) & M:
                self.state = "ESTABLISHED"
                self.rcv_nxt = seg.seq + 1
                self.peer_mss = seg.mss or 536
                self.shift = seg.wscale or 0 if self.wscale is not None else 0
                self.snd_wnd = seg.window
                self.ack_due = 1
                self.last_progress = now
            return
        if seg.flags & SYN:
            self.ack_due += 1            # retransmitted SYN-ACK: our ACK was lost
            return
        ack = self.snd_una + ((seg.ack - self.snd_una) & M if ((seg.ack - self.snd_una) & M)
                              < 1 << 31 else -((self.snd_una - seg.ack) & M))
        if ack > self.snd_una:
            self.snd_una = ack
            self.snd_nxt = max(self.snd_nxt, ack)
            self.last_progress = now
            self.dupacks = 0
            if self.want_fin and ack > self.fin_seq:
                self.fin_acked = True
        elif ack == self.snd_una and not seg.payload and self.snd_nxt > self.snd_una:
            self.dupacks += 1
            if self.dupacks == 3:
                self.snd_nxt = self.snd_una
        if self.sack and seg.sack_blocks:
            base = self.iss + 1
            for left, right in seg.sack_blocks:
                lo, hi = base + ((left - base) & M), base + ((right - base) & M)
                assert lo < hi <= self.fin_seq, "SACK of data never sent"
                for start in range(lo, hi, self.peer_mss):
                    if start + self.peer_mss <= hi or hi == self.fin_seq:
                        self.sacked.add(start)
        self.snd_wnd = seg.window << self.shift
        seq = self.rcv_nxt + (((seg.seq - self.rcv_nxt + (1 << 31)) & M) - (1 << 31))
        if seg.payload or seg.flags & FIN:
            self.ack_due = min(self.ack_due + 1, 3)
            if seg.payload and (seq + len(seg.payload) <= self.rcv_nxt or seq in self.ooo):
                self.spurious += len(seg.payload)
            if seq <= self.rcv_nxt < seq + len(seg.payload) or (
                    seq == self.rcv_nxt and not seg.payload):
                off = self.rcv_nxt - seq
                self.received += seg.payload[off:]
                self.rcv_nxt = seq + len(seg.payload)
                while self.rcv_nxt in self.ooo or any(
                        s < self.rcv_nxt < s + len(p) for s, p in self.ooo.items()):
                    start = min(s for s in self.ooo if s <= self.rcv_nxt)
                    data = self.ooo.pop(start)
                    self.received += data[self.rcv_nxt - start:]
                    self.rcv_nxt = max(self.rcv_nxt, start + len(data))
                for start in [s for s, p in self.ooo.items() if s + len(p) <= self.rcv_nxt]:
                    del self.ooo[start]
                if seg.flags & FIN and not self.fin_received:
                    self.fin_received = True
                    self.rcv_nxt += 1
            elif self.sack and seq > self.rcv_nxt and seg.payload and not seg.flags & FIN:
                self.ooo[seq] = bytes(seg.payload)
                self.latest_ooo = seq

    def poll(self, now: float) -> list[bytes]:
        out: list[bytes] = []
        if self.reset:
            return out
        if self.state == "SYN_SENT":
            if self.syn_sent_at is None or now - self.syn_sent_at >= 0.5:
                self.syn_sent_at = now
                out.append(self._pkt(self.iss, SYN, mss=self.mss, wscale=self.wscale,
                                 sack_permitted=self.sack))
            return out
        if self.snd_nxt > self.snd_una and now - self.last_progress > 0.3:
            self.snd_nxt = self.snd_una      # go-back-N timeout
            self.last_progress = now
        end = self.iss + 1 + len(self.data)
        limit = self.snd_una + max(self.snd_wnd, 0)
        while self.snd_nxt < end and self.snd_nxt < limit:
            if self.snd_nxt in self.sacked and self.snd_nxt + self.peer_mss < end:
                self.snd_nxt += self.peer_mss
                continue
            n = min(self.peer_mss, end - self.snd_nxt, limit - self.snd_nxt)
            off = self.snd_nxt - self.iss - 1
            fin = FIN if self.want_fin and self.snd_nxt + n == end else 0
            out.append(self._pkt(self.snd_nxt, ACK | fin, self.data[off:off + n]))
            self.snd_nxt += n + (1 if fin else 0)
            self.ack_due = 0
        if self.want_fin and self.snd_nxt == end:
            out.append(self._pkt(end, ACK | FIN))
            self.snd_nxt = end + 1
            self.ack_due = 0
        for _ in range(self.ack_due):
            out.append(self._pkt(self.snd_nxt, ACK))
        self.ack_due = 0
        return out


@dataclass
class Link:
    """One direction: delay + jitter (→ reordering), seeded loss and duplication."""
    rng: random.Random
    loss: float = 0.0
    dup: float = 0.0
    delay: float = 0.02
    jitter: float = 0.0
    queue: list[tuple[float, int, bytes]] = field(default_factory=list)
    counter: int = 0
    sent: int = 0

    def push(self, pkt: bytes, now: float) -> None:
        self.sent += 1
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            if self.rng.random() < self.loss:
                continue
            self.counter += 1
            t = now + self.delay + self.rng.random() * self.jitter
            self.queue.append((t, self.counter, pkt))

    def due(self, now: float) -> list[bytes]:
        ready = sorted(x for x in self.queue if x[0] <= now)
        self.queue = [x for x in self.queue if x[0] > now]
        return [p for _, _, p in ready]


@dataclass
class Sim:
    """Drives a Peer against a TcpEndpoint and a trivial driver with a fake clock."""
    peer: Peer
    ep: TcpEndpoint
    up: Link                  # peer → endpoint
    down: Link                # endpoint → peer
    backend_out: bytes = b""  # what the "backend" sends to the peer
    backend_close: bool = True
    read_enabled: bool = True
    budget: int = 64
    now: float = 0.0
    got: bytearray = field(default_factory=bytearray)
    sent_off: int = 0
    closed_sent: bool = False
    accepted: bool = True

    def step(self, dt: float = 0.005) -> None:
        self.now += dt
        for pkt in self.up.due(self.now):
            ip = parse_ip(pkt)
            self.ep.on_segment(parse_tcp(pkt, ip), now=self.now)
        if self.accepted and self.ep.state.name == "SYN_RECEIVED" and not self.ep._accepted:
            self.ep.accept(now=self.now)
        if self.read_enabled:
            self.got += self.ep.read()
        if self.ep.established or self.ep.state.name == "SYN_RECEIVED":
            if self.sent_off < len(self.backend_out) and self.ep.send_space():
                self.sent_off += self.ep.send(
                    memoryview(self.backend_out)[self.sent_off:self.sent_off + 65536])
            if (self.backend_close and not self.closed_sent
                    and self.sent_off == len(self.backend_out) and self.ep.established):
                self.ep.close(now=self.now)
                self.closed_sent = True
        d = self.ep.next_deadline()
        if d is not None and d <= self.now:
            self.ep.on_timer(now=self.now)
        for pkt in self.ep.poll(now=self.now, budget=self.budget):
            self.down.push(pkt, self.now)
        for pkt in self.down.due(self.now):
            self.peer.on_packet(pkt, self.now)
        for pkt in self.peer.poll(self.now):
            self.up.push(pkt, self.now)

    def run(self, until, limit: float = 120.0) -> None:
        while not until():
            if self.now > limit:
                raise AssertionError(f"simulation did not finish by t={limit}: "
                                     f"ep={self.ep.state} peer={self.peer.state}")
            self.step()
