"""The Connector's side of hole punching: answer offers, then probe from the P2P socket.

* ``PunchOffer`` (from the Intermediate, on the relay connection's control stream): gather
  this Connector's candidates for the **P2P socket** — every interface address with the P2P
  port (never 0.0.0.0), the P2P socket's own QAD address as srflx, the
  Intermediate as relay — and answer ``PunchAnswer``.
* ``PunchStart``: a controlled `ztna.p2p.punch.PunchSession`, handed to the P2P socket
  (`ztna.p2p_socket.P2PSocket`): its probes leave from that socket, probes arriving there
  (first byte < 0x40) are routed to the session named in them, its retransmits run on the
  socket's one timer. Both sides probe. The Agent then connects to the P2P QUIC server on
  that same socket, through the mapping the checks opened.
* Sessions are bounded and linger a little after they end so late probes are still answered.
* The candidates are republished (`StandingCandidates`) whenever the socket's public address
  or the interface list changes, and after the relay link moves to another Intermediate
  (whose address is then the relay candidate).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from ztna.observe import format_address
from ztna.p2p.candidates import gather
from ztna.p2p.punch import PunchSession, PunchState
from ztna.p2p.router import SESSION_DROPS, ProbeRouter, Progress
from ztna.p2p_socket import P2PSocket
from ztna.quic.connection import ZtnaConnection
from ztna.wire import ObservedAddress, encode_control
from ztna.wire.control_messages import (
    ErrorMessage,
    PunchAnswer,
    PunchOffer,
    PunchResult,
    PunchStart,
    StandingCandidates,
)

log = logging.getLogger("ztna.connector")

MAX_SESSIONS = 256
LINGER = 10.0          # keep answering late probes this long after a session ends


class P2PPort(Protocol):
    """What punching needs of the P2P server (``ztna.connector.p2p_server.P2PServer``): its
    socket (probe routing, public address), its port. A Protocol, so that this module does
    not import the server."""

    @property
    def sock(self) -> P2PSocket[None] | None: ...
    @property
    def local_port(self) -> int: ...
    @property
    def public_address(self) -> ObservedAddress | None: ...


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ConnectorPunch:
    def __init__(self, p2p: P2PPort, *,
                 relay_address: Callable[[], tuple[str, int]] | None = None) -> None:
        self.p2p = p2p
        self._relay_address = relay_address   # the Intermediate the relay link is on now
        self.candidates: dict[int, tuple[Any, ...]] = {}
        self.offers = 0
        self.direct = 0
        self.failed = 0
        self.addresses: list[str] = []
        self.relay_conn: ZtnaConnection | None = None   # where StandingCandidates go
        self._published: tuple[Any, ...] | None = None

    @property
    def _router(self) -> ProbeRouter[None] | None:
        sock = self.p2p.sock
        return sock.router if sock is not None else None

    @property
    def sessions(self) -> dict[int, PunchSession]:
        """The punch sessions held now (the socket's probe router), by id."""
        router = self._router
        return {s.session: s for s in router.sessions()} if router is not None else {}

    @property
    def unknown_probes(self) -> int:
        router = self._router
        return router.unknown_session if router is not None else 0

    @property
    def drops(self) -> dict[str, int]:
        """Non-QUIC datagrams on the P2P socket that were dropped, by reason (every reason,
        from 0, so /metrics shows them all)."""
        router = self._router
        out = dict.fromkeys(["not_a_probe", "probe_unknown_session",
                             *(f"probe_{n}" for n in SESSION_DROPS)], 0)
        if router is not None:
            out["not_a_probe"] = router.not_a_probe
            out["probe_unknown_session"] = router.unknown_session
            for name, count in router.session_drops.items():
                out[f"probe_{name}"] = count
        return out

    @property
    def relay_address(self) -> tuple[str, int] | None:
        """The relay candidate: the Intermediate the link is on, when given as an IP."""
        addr = self._relay_address() if self._relay_address is not None else None
        return addr if addr is not None and _is_ip(addr[0]) else None

    # The P2P socket's events (ztna.p2p_socket.P2POwner).
    def on_public_address(self, addr: ObservedAddress) -> None:
        self.publish()

    def on_addresses(self, addresses: list[str]) -> None:
        self.addresses = addresses
        self.publish()

    def on_punch(self, progress: Progress[None]) -> None:
        session = progress.route.session
        if progress.finished:
            if session.state is PunchState.NOMINATED:
                self.direct += 1
                log.info("punch %016x: agent nominated %s", session.session, format_address(session.selected))
            else:
                self.failed += 1
                log.info("punch %016x: no direct path (staying on relay)", session.session)

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
            if self.p2p.sock is not None:
                self.p2p.sock.punch(session, None)
        elif isinstance(msg, PunchResult):
            log.info("punch %016x: agent reports %s", msg.session,
                     f"direct via {format_address((msg.ip, msg.port))}" if msg.ok else "failure")
        elif isinstance(msg, ErrorMessage) and msg.session is not None:
            if self.p2p.sock is not None:
                self.p2p.sock.discard(msg.session)

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
