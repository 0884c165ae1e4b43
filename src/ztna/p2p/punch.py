"""One hole-punch session: connectivity checks as a pure, table-driven state machine.

Theory of operation
-------------------
Both sides (Agent = controlling, Connector = controlled) get the same session id and 32-byte
key from the Intermediate (`PunchStart`) plus the other side's candidates. From then on:

* **Everything goes through one socket**, the P2P socket that later carries the direct QUIC
  connection, so the NAT mapping a check validates is the one QUIC uses. A pair is
  therefore just a remote address; the local side of every pair is that socket.
* **Both sides probe at once**, every remote address in parallel (no 50 ms tick, no one
  check per tick): the first request goes out at start, retries follow after
  `initial_interval` (≈ RTT/10 like iroh, 25 ms by default), growing by `backoff` up to
  `max_interval`, and stop after `check_timeout` (2 s). Each send uses a fresh random
  transaction id (injected `rng`), so every response also measures an exact RTT.
* **Every valid request is answered** (in any state, so a late peer still validates),
  with the source address we saw (server-reflexive/peer-reflexive discovery). A request
  from an address we did not know becomes a ``prflx`` pair and gets a triggered check at
  once; a request on a known pair triggers an immediate check too (the peer's NAT just
  opened towards us).
* **Responses count only if the txid is ours and the source is the address we sent that
  txid to** (not txid alone). Probes are HMAC-authenticated with the session key
  (`ztna.wire.probe`); anything else is dropped and counted, never answered.
* **Nomination**: the controlling side waits, after its first success, at most a short
  settle time (≈ RTT/4, 5–50 ms) for better pairs still in flight (IPv6 host pairs rank
  above IPv4 srflx ones), then selects the best validated pair and is done at once — that
  pair already carried a request and a response both ways. It sends requests with the
  nominate flag a few times so the controlled side learns the choice; the controlled side
  is done when such a request arrives.
* **No pair works** (e.g. a symmetric NAT on one side with port-dependent filtering on the
  other): after `check_timeout` the session is FAILED, quietly. The path manager keeps the
  relay and retries later.

The transition table `TRANSITIONS` is the whole state machine; `(state, event)` pairs not
in it leave the state unchanged. Time comes in as `now`, randomness as `rng(n) -> bytes`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from typing import Final

from ztna.errors import DecodeError, UsageError
from ztna.p2p.candidates import candidate_priority, pair_priority
from ztna.wire.control_messages import Candidate
from ztna.wire.probe import (
    PROBE_KEY_LEN,
    TXID_LEN,
    ProbeAuthError,
    ProbeRequest,
    ProbeResponse,
    decode_probe,
    encode_probe,
)

__all__ = ["Event", "PunchConfig", "PunchSession", "PunchState", "Send", "TRANSITIONS", "normalize"]

Address = tuple[str, int]


class PunchState(Enum):
    WAITING = "waiting"        # PunchStart received, start time not reached
    PROBING = "probing"        # checks in flight, nothing validated yet
    VALIDATED = "validated"    # at least one pair answered; controlling: settling
    NOMINATED = "nominated"    # a pair is selected: done (success)
    FAILED = "failed"          # no pair answered in time: stay on the relay


class Event(Enum):
    START = "start"
    PAIR_SUCCEEDED = "pair_succeeded"
    NOMINATE = "nominate"
    TIMEOUT = "timeout"
    CLOSE = "close"


S, E = PunchState, Event
TRANSITIONS: Final[dict[tuple[PunchState, Event], PunchState]] = {
    (S.WAITING, E.START): S.PROBING,
    (S.WAITING, E.NOMINATE): S.NOMINATED,      # controlled: peer started (and chose) first
    (S.WAITING, E.CLOSE): S.FAILED,
    (S.PROBING, E.PAIR_SUCCEEDED): S.VALIDATED,
    (S.PROBING, E.NOMINATE): S.NOMINATED,
    (S.PROBING, E.TIMEOUT): S.FAILED,
    (S.PROBING, E.CLOSE): S.FAILED,
    (S.VALIDATED, E.NOMINATE): S.NOMINATED,
    (S.VALIDATED, E.TIMEOUT): S.FAILED,        # controlled side never told the choice
    (S.VALIDATED, E.CLOSE): S.FAILED,
}
del S, E

_ACTIVE: Final = frozenset({PunchState.PROBING, PunchState.VALIDATED})


@dataclass(frozen=True, slots=True)
class Send:
    """Send these bytes from the P2P socket to `addr`."""

    data: bytes
    addr: Address


@dataclass(frozen=True, slots=True)
class PunchConfig:
    initial_interval: float = 0.025   # first retry; ≈ RTT/10
    backoff: float = 1.5
    max_interval: float = 0.4
    check_timeout: float = 2.0        # no success by then: FAILED
    settle_min: float = 0.005
    settle_max: float = 0.05
    nominate_count: int = 4           # nominate requests sent (paced like retries)
    triggered_gap: float = 0.005      # min gap between two sends to one pair
    max_pairs: int = 32               # remote addresses incl. learned prflx
    max_pending_txids: int = 1024

    def __post_init__(self) -> None:
        if not (0 < self.initial_interval <= self.max_interval and self.backoff >= 1.0
                and self.check_timeout > 0 and self.max_pairs > 0):
            raise UsageError("bad punch timing configuration")


def normalize(addr: tuple[object, ...]) -> Address:
    """(ip, port) with IPv4-mapped IPv6 shown as IPv4 and any zone dropped."""
    host = str(addr[0]).split("%", 1)[0]
    port = addr[1]
    if not isinstance(port, int):
        raise UsageError("port must be an int")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"bad address {host!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped), port
    return str(ip), port


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


@dataclass(slots=True)
class Pair:
    addr: Address
    remote: Candidate
    priority: int
    sends: int = 0
    next_send: float | None = None
    interval: float = 0.0
    last_send: float = float("-inf")
    succeeded: bool = False
    rtt: float | None = None


@dataclass(slots=True)
class PunchStats:
    requests_sent: int = 0
    responses_sent: int = 0
    responses_received: int = 0
    requests_received: int = 0
    bad_mac: int = 0
    malformed: int = 0
    wrong_session: int = 0
    unknown_txid: int = 0
    wrong_source: int = 0
    prflx_learned: int = 0
    role_conflicts: int = 0


@dataclass(slots=True)
class _Pending:
    addr: Address
    sent_at: float
    nominate: bool


class PunchSession:
    """Connectivity checks of one session on one socket. Feed it `on_datagram` for every
    probe received on the P2P socket and `on_timer` at `next_deadline()`; send what they
    return with the P2P socket."""

    def __init__(
        self,
        *,
        session: int,
        key: bytes,
        controlling: bool,
        local: Sequence[Candidate],
        remote: Sequence[Candidate],
        rng: Callable[[int], bytes],
        now: float,
        start_at: float | None = None,
        config: PunchConfig | None = None,
    ) -> None:
        if len(key) != PROBE_KEY_LEN:
            raise UsageError(f"probe key must be {PROBE_KEY_LEN} bytes")
        self.session = session
        self.key = bytes(key)
        self.controlling = controlling
        self.config = config or PunchConfig()
        self.rng = rng
        self.state = PunchState.WAITING
        self.created_at = now
        self.start_at = now if start_at is None else start_at
        self.started_at: float | None = None
        self.first_probe_at: float | None = None
        self.validated_at: float | None = None
        self.nominated_at: float | None = None
        self.failed_at: float | None = None
        self.selected: Address | None = None
        self.selected_rtt: float | None = None
        self.mapped: set[Address] = set()       # how the peer saw us (srflx/prflx)
        self.stats = PunchStats()
        self._settle_until: float | None = None
        self._nominate_left = 0
        self._nominate_next: float | None = None
        self._nominate_interval = self.config.initial_interval
        self._nominate_acked = False
        self._pending: dict[bytes, _Pending] = {}
        self._local_best: dict[int, int] = {}
        for c in local:
            fam = _family(c.ip)
            self._local_best[fam] = max(self._local_best.get(fam, 0), c.priority)
        self.pairs: dict[Address, Pair] = {}
        for c in sorted(remote, key=lambda c: c.priority, reverse=True):
            self._add_pair(c)

    # ------------------------------------------------------------------ state machine
    def _fire(self, event: Event, *, now: float) -> bool:
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            return False
        self.state = new
        if new is PunchState.PROBING:
            self.started_at = now
        elif new is PunchState.VALIDATED:
            self.validated_at = now
        elif new is PunchState.NOMINATED:
            self.nominated_at = now
        elif new is PunchState.FAILED:
            self.failed_at = now
        return True

    @property
    def done(self) -> bool:
        return self.state in (PunchState.NOMINATED, PunchState.FAILED)

    def close(self, *, now: float) -> None:
        self._fire(Event.CLOSE, now=now)

    # ------------------------------------------------------------------ pairs
    def _add_pair(self, remote: Candidate) -> Pair | None:
        if remote.kind == "relay":
            return None  # the relay path is the Intermediate connection, never probed
        addr = (remote.ip, remote.port)
        if addr in self.pairs or len(self.pairs) >= self.config.max_pairs:
            return None
        fam = _family(remote.ip)
        if self._local_best and fam not in self._local_best:
            return None  # we have no address of that family: nothing could answer
        local = self._local_best.get(fam, candidate_priority("host", remote.ip))
        if self.controlling:
            prio = pair_priority(local, remote.priority)
        else:
            prio = pair_priority(remote.priority, local)
        pair = Pair(addr=addr, remote=remote, priority=prio, interval=self.config.initial_interval)
        self.pairs[addr] = pair
        return pair

    def _request(self, addr: Address, *, now: float, nominate: bool) -> Send:
        txid = self.rng(TXID_LEN)
        if len(txid) != TXID_LEN:
            raise UsageError("rng returned the wrong number of bytes")
        if len(self._pending) >= self.config.max_pending_txids:
            self._pending.pop(next(iter(self._pending)))  # oldest first
        self._pending[txid] = _Pending(addr, now, nominate)
        self.stats.requests_sent += 1
        if self.first_probe_at is None:
            self.first_probe_at = now
        msg = ProbeRequest(self.session, txid, nominate, self.controlling)
        return Send(encode_probe(msg, self.key), addr)

    def _send_pair(self, pair: Pair, *, now: float) -> Send:
        pair.sends += 1
        pair.last_send = now
        pair.next_send = now + pair.interval
        pair.interval = min(pair.interval * self.config.backoff, self.config.max_interval)
        return self._request(pair.addr, now=now, nominate=False)

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        state = self.state
        if state is PunchState.WAITING:
            return self.start_at
        deadlines: list[float] = []
        if state in _ACTIVE:
            assert self.started_at is not None
            deadlines.append(self.started_at + self.config.check_timeout)
            deadlines += [p.next_send for p in self.pairs.values()
                          if p.next_send is not None and not p.succeeded]
            if self._settle_until is not None:
                deadlines.append(self._settle_until)
        if self._nominate_next is not None and self._nominate_left > 0 and not self._nominate_acked:
            deadlines.append(self._nominate_next)
        return min(deadlines) if deadlines else None

    def on_timer(self, *, now: float) -> list[Send]:
        out: list[Send] = []
        if self.state is PunchState.WAITING and now >= self.start_at:
            self._start(now)
        if self.state in _ACTIVE:
            assert self.started_at is not None
            if now >= self.started_at + self.config.check_timeout:
                self._fire(Event.TIMEOUT, now=now)
                for p in self.pairs.values():
                    p.next_send = None
            else:
                for pair in self.pairs.values():
                    if not pair.succeeded and pair.next_send is not None and pair.next_send <= now:
                        out.append(self._send_pair(pair, now=now))
                if self.controlling and self.state is PunchState.VALIDATED:
                    self._maybe_nominate(now, out)
        out += self._nominate_sends(now)
        return out

    def _start(self, now: float) -> None:
        self._fire(Event.START, now=now)
        for pair in self.pairs.values():
            pair.next_send = now

    def _maybe_nominate(self, now: float, out: list[Send]) -> None:
        succeeded = [p for p in self.pairs.values() if p.succeeded]
        if not succeeded:
            return
        best = max(succeeded, key=lambda p: p.priority)
        still_possible = [p.priority for p in self.pairs.values() if not p.succeeded and p.next_send is not None]
        settled = self._settle_until is not None and now >= self._settle_until
        if not settled and still_possible and max(still_possible) > best.priority:
            return
        self.selected = best.addr
        self.selected_rtt = best.rtt
        self._settle_until = None
        self._fire(Event.NOMINATE, now=now)
        for p in self.pairs.values():
            p.next_send = None
        self._nominate_left = self.config.nominate_count
        self._nominate_next = now

    def _nominate_sends(self, now: float) -> list[Send]:
        if (self._nominate_next is None or self._nominate_left <= 0 or self._nominate_acked
                or now < self._nominate_next or self.selected is None):
            return []
        self._nominate_left -= 1
        self._nominate_next = now + self._nominate_interval
        self._nominate_interval = min(self._nominate_interval * 2, self.config.max_interval)
        return [self._request(self.selected, now=now, nominate=True)]

    # ------------------------------------------------------------------ receive
    def on_datagram(self, data: bytes, addr: tuple[object, ...], *, now: float) -> list[Send]:
        source = normalize(addr)
        try:
            msg = decode_probe(data, self.key)
        except ProbeAuthError:
            self.stats.bad_mac += 1
            return []
        except DecodeError:
            self.stats.malformed += 1
            return []
        if msg.session != self.session:
            self.stats.wrong_session += 1
            return []
        if isinstance(msg, ProbeRequest):
            return self._on_request(msg, source, now)
        self._on_response(msg, source, now)
        out: list[Send] = []
        if self.controlling and self.state is PunchState.VALIDATED:
            self._maybe_nominate(now, out)
            out += self._nominate_sends(now)
        return out

    def _on_request(self, msg: ProbeRequest, source: Address, now: float) -> list[Send]:
        self.stats.requests_received += 1
        if msg.controlling == self.controlling:
            self.stats.role_conflicts += 1  # both think they control: the Intermediate assigns roles
            return []
        response = ProbeResponse(self.session, msg.txid, source[0], source[1])
        out = [Send(encode_probe(response, self.key), source)]
        self.stats.responses_sent += 1
        if self.state is PunchState.WAITING:
            self._start(now)  # the peer has started: no reason to wait any longer
        if msg.nominate and not self.controlling and self.selected is None:
            self.selected = source
            pair = self.pairs.get(source)
            self.selected_rtt = pair.rtt if pair else None
            self._fire(Event.NOMINATE, now=now)
            for p in self.pairs.values():
                p.next_send = None
            return out
        if self.state not in _ACTIVE:
            return out
        pair = self.pairs.get(source)
        if pair is None:
            learned = Candidate(kind="prflx", ip=source[0], port=source[1],
                                priority=candidate_priority("prflx", source[0]), foundation="prflx")
            pair = self._add_pair(learned)
            if pair is None:
                return out
            self.stats.prflx_learned += 1
        if not pair.succeeded and now - pair.last_send >= self.config.triggered_gap:
            # Triggered check: the peer's request got through, so its NAT now lets ours in.
            # The backoff is not reset, so a peer's retries cannot make us send faster.
            out.append(self._send_pair(pair, now=now))
        return out

    def _on_response(self, msg: ProbeResponse, source: Address, now: float) -> None:
        pending = self._pending.get(msg.txid)
        if pending is None:
            self.stats.unknown_txid += 1
            return
        if pending.addr != source:
            self.stats.wrong_source += 1  # right txid, wrong sender: not proof of this path
            return
        del self._pending[msg.txid]
        self.stats.responses_received += 1
        self.mapped.add((msg.mapped_ip, msg.mapped_port))
        if pending.nominate:
            self._nominate_acked = True
            return
        if self.state not in _ACTIVE:
            return
        pair = self.pairs.get(source)
        if pair is None or pair.succeeded:
            return
        pair.succeeded = True
        pair.rtt = now - pending.sent_at
        pair.next_send = None
        if self._fire(Event.PAIR_SUCCEEDED, now=now) and self.controlling:
            settle = min(max(pair.rtt / 4, self.config.settle_min), self.config.settle_max)
            self._settle_until = now + settle

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict[str, object]:
        return {
            "session": self.session,
            "state": self.state.value,
            "selected": f"{self.selected[0]}:{self.selected[1]}" if self.selected else None,
            "pairs": len(self.pairs),
            "succeeded": sum(1 for p in self.pairs.values() if p.succeeded),
            "mapped": sorted(f"{ip}:{port}" for ip, port in self.mapped),
            **{f.name: getattr(self.stats, f.name) for f in fields(self.stats)},
        }
