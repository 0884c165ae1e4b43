"""The Connector's side of hole punching: answer offers, then probe from the P2P socket.

* ``PunchOffer`` (from the Intermediate, on the relay connection's control stream): gather
  this Connector's candidates for the **P2P socket** — every interface address with the P2P
  port (never 0.0.0.0), the P2P socket's own QAD address as srflx, the
  Intermediate as relay — and answer ``PunchAnswer``.
* ``PunchStart``: a controlled `ztna.p2p.punch.PunchSession`; its probes leave from the P2P
  socket (`P2PServer.send_raw`), and probes arriving there (first byte < 0x40) are routed to
  the session named in them. Both sides probe. The Agent then connects to the
  P2P QUIC server on that same socket, through the mapping the checks opened.
* Sessions are bounded and linger a little after they end so late probes are still answered.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from typing import TYPE_CHECKING, Any

from ztna.observe import format_address
from ztna.p2p.candidates import gather, interface_addresses
from ztna.p2p.punch import PunchSession, PunchState
from ztna.quic.connection import ZtnaConnection
from ztna.wire import encode_control
from ztna.wire.control_messages import (
    ErrorMessage,
    PunchAnswer,
    PunchOffer,
    PunchResult,
    PunchStart,
    StandingCandidates,
)
from ztna.wire.probe import probe_session_of

if TYPE_CHECKING:
    from ztna.connector.p2p_server import P2PServer

# PunchStats counters that each mean "this probe was dropped", for the Connector's totals.
_SESSION_DROPS = ("bad_mac", "malformed", "wrong_session", "unknown_txid", "wrong_source",
                  "role_conflicts")

log = logging.getLogger("ztna.connector")

MAX_SESSIONS = 256
LINGER = 10.0          # keep answering late probes this long after a session ends


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ConnectorPunch:
    def __init__(self, p2p: P2PServer, *, relay_address: tuple[str, int] | None = None) -> None:
        self.p2p = p2p
        self.relay_address = relay_address if relay_address and _is_ip(relay_address[0]) else None
        self.sessions: dict[int, PunchSession] = {}
        self.candidates: dict[int, tuple[Any, ...]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.offers = 0
        self.direct = 0
        self.failed = 0
        self.unknown_probes = 0
        # Non-QUIC datagrams on the P2P socket that were dropped, by reason (all start at 0,
        # so /metrics shows every reason).
        self.drops: dict[str, int] = dict.fromkeys(
            ["not_a_probe", "probe_unknown_session", *(f"probe_{n}" for n in _SESSION_DROPS)], 0)
        self.addresses: list[str] = []
        p2p.raw_handler = self.on_raw
        self.relay_conn: ZtnaConnection | None = None   # where StandingCandidates go
        self._published: tuple[Any, ...] | None = None
        chained = p2p.on_public_address

        def public_address_changed(addr: Any) -> None:
            if chained is not None:
                chained(addr)
            self.publish()

        p2p.on_public_address = public_address_changed
        self._task = asyncio.get_running_loop().create_task(self._address_loop())

    async def _address_loop(self) -> None:
        """Interface addresses (netlink runs its own loop, so in a thread), refreshed."""
        while True:
            try:
                self.addresses = await asyncio.to_thread(interface_addresses)
            except Exception as exc:  # noqa: BLE001 - srflx alone may still work
                log.warning("cannot list interface addresses: %s", exc)
            self.publish()
            await asyncio.sleep(10.0)

    def close(self) -> None:
        self._task.cancel()
        if self._timer is not None:
            self._timer.cancel()

    # ------------------------------------------------------------------ signaling
    def _gather(self) -> tuple[Any, ...]:
        pa = self.p2p.public_address
        return gather(self.p2p.local_port, self.addresses,
                      observed=(pa.ip, pa.port) if pa is not None else None,
                      relay=self.relay_address)

    def on_registered(self, conn: ZtnaConnection) -> None:
        self.relay_conn = conn
        self._published = None
        self.publish()

    def publish(self) -> None:
        """Tell the Intermediate our P2P candidates ahead of any punch (StandingCandidates),
        so a punch starts without the offer/answer round trip. Only when they changed."""
        conn = self.relay_conn
        if conn is None or conn.closed:
            return
        cands = self._gather()
        if not cands or cands == self._published:
            return
        self._published = cands
        conn.send_control(encode_control(StandingCandidates(candidates=cands)))

    def on_message(self, conn: ZtnaConnection, msg: object) -> None:
        if isinstance(msg, PunchOffer):
            self.offers += 1
            cands = self._gather()
            self.candidates[msg.session] = cands
            while len(self.candidates) > MAX_SESSIONS:
                self.candidates.pop(next(iter(self.candidates)))
            conn.send_control(encode_control(PunchAnswer(session=msg.session, candidates=cands)))
            log.info("punch offer %016x from agent %d for %s: answered with %d candidates",
                     msg.session, msg.agent, msg.service, len(cands))
        elif isinstance(msg, PunchStart):
            loop = asyncio.get_running_loop()
            now = loop.time()
            # Without an offer (the Intermediate used our StandingCandidates), gather now.
            local = self.candidates.pop(msg.session, None) or self._gather()
            session = PunchSession(session=msg.session, key=msg.key_bytes,
                                   controlling=msg.role == "controlling", local=local,
                                   remote=msg.peer_candidates, rng=secrets.token_bytes,
                                   now=now, start_at=now + msg.start_in_ms / 1000)
            self.sessions[msg.session] = session
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
            self._run(session, now)
        elif isinstance(msg, PunchResult):
            log.info("punch %016x: agent reports %s", msg.session,
                     f"direct via {format_address((msg.ip, msg.port))}" if msg.ok else "failure")
        elif isinstance(msg, ErrorMessage) and msg.session is not None:
            self.sessions.pop(msg.session, None)

    # ------------------------------------------------------------------ probes
    def on_raw(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        sid = probe_session_of(data)
        if sid is None:
            self.drops["not_a_probe"] += 1   # first byte < 0x40 but no probe header
            return
        session = self.sessions.get(sid)
        if session is None:
            self.unknown_probes += 1   # not ours: dropped unanswered
            self.drops["probe_unknown_session"] += 1
            return
        st = session.stats
        before = [getattr(st, name) for name in _SESSION_DROPS]
        self._send(session.on_datagram(data, addr, now=now))
        # The session keeps its own counters and is forgotten after LINGER; carry what it
        # dropped (bad MAC, undecodable, stale txid, ...) into our totals for /metrics.
        for name, old in zip(_SESSION_DROPS, before, strict=True):
            self.drops[f"probe_{name}"] += getattr(st, name) - old
        self._after(session, now)

    def _run(self, session: PunchSession, now: float) -> None:
        self._send(session.on_timer(now=now))
        self._after(session, now)

    def _send(self, sends: list[Any]) -> None:
        for s in sends:
            self.p2p.send_raw(s.data, s.addr)

    def _after(self, session: PunchSession, now: float) -> None:
        if session.done and not getattr(session, "_reported", False):
            session._reported = True  # type: ignore[attr-defined]
            if session.state is PunchState.NOMINATED:
                self.direct += 1
                log.info("punch %016x: agent nominated %s", session.session, format_address(session.selected))
            else:
                self.failed += 1
                log.info("punch %016x: no direct path (staying on relay)", session.session)
        self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None
        for sid, s in list(self.sessions.items()):
            d = s.next_deadline()
            if d is None:
                if s.done and now - (s.nominated_at or s.failed_at or now) > LINGER:
                    del self.sessions[sid]
                continue
            deadline = d if deadline is None else min(deadline, d)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = asyncio.get_running_loop().time()
        for s in list(self.sessions.values()):
            d = s.next_deadline()
            if d is not None and d <= now:
                self._send(s.on_timer(now=now))
                self._after(s, now)
        self._arm()

    def punch_ms_for(self, addr: tuple[Any, ...]) -> float | None:
        """How long the punch that selected the Agent address `addr` took (ms), if one did."""
        host, port = str(addr[0]).split("%")[0], int(addr[1])
        if host.startswith("::ffff:"):
            host = host[7:]
        for s in reversed(list(self.sessions.values())):
            sel = s.selected
            done = s.nominated_at or s.validated_at
            if sel is not None and done is not None and (str(sel[0]), int(sel[1])) == (host, port):
                return (done - s.created_at) * 1000
        return None

    def snapshot(self) -> dict[str, Any]:
        return {"offers": self.offers, "direct": self.direct, "failed": self.failed,
                "unknown_probes": self.unknown_probes, "sessions": len(self.sessions)}
