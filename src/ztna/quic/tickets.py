"""Session tickets for resumption and 0-RTT, with replay protection (issue 8).

Server side — `ServerTicketStore`
---------------------------------
aioquic's tickets are *stateful*: the ticket on the wire is a random 64-byte label and the
server keeps the resumption secret. We keep them in SQLite (file mode 0600), which gives:

* **Single use (strike register)**: `take()` deletes the row it returns (`DELETE …
  RETURNING` in one statement), so a captured early flight replayed later finds no ticket,
  the TLS handshake falls back to a full one, and the replayed 0-RTT packets cannot even be
  decrypted: no second effect (RFC 8446 §8.1).
* **Freshness window**: a ticket older than `max_age` is refused (and purged).
* **Key rotation**: every ticket belongs to a key epoch; `rotate()` starts a new epoch and
  tickets from epochs older than the previous one are refused — a clean fall back to a
  full handshake.
* **Several Intermediate processes** get 0-RTT only if they share the same database file
  (the same strike register); with separate stores a ticket from another process is simply
  unknown, so 0-RTT is refused, never accepted twice.
* **Identity**: a resumed session presents no certificate. The identity verified when the
  ticket was issued is stored with it and restored on `take()`.

Client side — `ClientTicketCache`
---------------------------------
One file per server name in the program's state directory (mode 0600), newest tickets
first, bounded count, expired ones dropped. Each ticket is used once (the server would
refuse it the second time anyway).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("ztna.quic.tickets")


@dataclass
class TicketStats:
    issued: int = 0
    resumed: int = 0
    refused_unknown: int = 0
    refused_expired: int = 0
    refused_rotated: int = 0


def _identity_to_json(identity: Any) -> str:
    if identity is None:
        return "null"
    return json.dumps(
        {
            "common_name": identity.common_name,
            "agent_services": sorted(identity.agent_services),
            "connector_services": sorted(identity.connector_services),
            "agent_wildcard": identity.agent_wildcard,
            "connector_wildcard": identity.connector_wildcard,
            "fingerprint": identity.fingerprint,
        }
    )


def _identity_from_json(text: str) -> Any:
    data = json.loads(text)
    if data is None:
        return None
    from ztna.identity import Identity

    return Identity(
        common_name=data["common_name"],
        agent_services=frozenset(data["agent_services"]),
        connector_services=frozenset(data["connector_services"]),
        agent_wildcard=data["agent_wildcard"],
        connector_wildcard=data["connector_wildcard"],
        fingerprint=data["fingerprint"],
    )


class ServerTicketStore:
    def __init__(
        self,
        path: str | Path | None = None,
        *,
        max_age: float = 7200.0,
        max_tickets: int = 100_000,
        clock: Any = time.time,
    ) -> None:
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
            os.close(fd)
            os.chmod(path, 0o600)
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        self.db.execute("PRAGMA journal_mode=WAL" if path else "PRAGMA journal_mode=MEMORY")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS tickets (label BLOB PRIMARY KEY, ticket BLOB NOT NULL,"
            " identity TEXT NOT NULL, issued REAL NOT NULL, epoch INTEGER NOT NULL)"
        )
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL)")
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('epoch', 1)")
        self.max_age = max_age
        self.max_tickets = max_tickets
        self.clock = clock
        self.stats = TicketStats()
        self._pending: dict[Any, Any] = {}

    @property
    def epoch(self) -> int:
        return int(self.db.execute("SELECT v FROM meta WHERE k='epoch'").fetchone()[0])

    def rotate(self) -> int:
        """Start a new key epoch; tickets two epochs old are refused from now on."""
        self.db.execute("UPDATE meta SET v = v + 1 WHERE k='epoch'")
        epoch = self.epoch
        self.db.execute("DELETE FROM tickets WHERE epoch < ?", (epoch - 1,))
        log.info("session ticket epoch rotated to %d", epoch)
        return epoch

    # -- called by aioquic (through the endpoint) -------------------------------------
    def issue(self, ticket: Any, holder: list[Any]) -> None:
        """A ticket was issued on a connection; it is stored once the peer's identity is
        verified (`bind_identity`)."""
        if holder:
            self._pending[holder[0]] = ticket

    def bind_identity(self, conn: Any) -> None:
        ticket = self._pending.pop(conn, None)
        if ticket is None:
            return
        self.db.execute(
            "INSERT OR REPLACE INTO tickets VALUES (?, ?, ?, ?, ?)",
            (ticket.ticket, pickle.dumps(ticket), _identity_to_json(conn.identity), self.clock(), self.epoch),
        )
        self.stats.issued += 1
        if self.stats.issued % 1000 == 0:
            self._purge()

    def take(self, label: bytes, holder: list[Any]) -> Any:
        row = self.db.execute(
            "DELETE FROM tickets WHERE label = ? RETURNING ticket, identity, issued, epoch", (label,)
        ).fetchone()
        if row is None:
            self.stats.refused_unknown += 1
            return None
        blob, identity_json, issued, epoch = row
        if self.clock() - issued > self.max_age:
            self.stats.refused_expired += 1
            return None
        if epoch < self.epoch - 1:
            self.stats.refused_rotated += 1
            return None
        self.stats.resumed += 1
        if holder:
            conn = holder[0]
            conn.identity = _identity_from_json(identity_json)
            # RFC 8446 §4.3.2: no CertificateRequest with a PSK. aioquic would still wait
            # for a client Certificate after a resumed ClientHello, so clear its flag.
            conn.quic.tls._request_client_certificate = False
        return pickle.loads(blob)  # noqa: S301 - our own 0600 database

    def forget_connection(self, conn: Any) -> None:
        self._pending.pop(conn, None)

    def _purge(self) -> None:
        self.db.execute("DELETE FROM tickets WHERE issued < ?", (self.clock() - self.max_age,))
        count = self.db.execute("SELECT COUNT(*) FROM tickets").fetchone()[0]
        if count > self.max_tickets:
            self.db.execute(
                "DELETE FROM tickets WHERE label IN (SELECT label FROM tickets ORDER BY issued LIMIT ?)",
                (count - self.max_tickets,),
            )

    def close(self) -> None:
        self.db.close()


class ClientTicketCache:
    """Tickets a client received, per server name, in `directory` (0600 files)."""

    def __init__(self, directory: str | Path, *, max_tickets: int = 4) -> None:
        self.directory = Path(directory)
        self.max_tickets = max_tickets

    def _file(self, server_name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in server_name)
        return self.directory / f"tickets-{safe}.pickle"

    def _load(self, server_name: str) -> list[Any]:
        try:
            with open(self._file(server_name), "rb") as fh:
                tickets = pickle.load(fh)  # noqa: S301 - our own 0600 file
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError):
            return []
        return [t for t in tickets if getattr(t, "is_valid", False)]

    def _save(self, server_name: str, tickets: list[Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._file(server_name)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(tickets[: self.max_tickets], fh)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)

    def add(self, ticket: Any) -> None:
        name = ticket.server_name or ""
        tickets = [t for t in self._load(name) if t.ticket != ticket.ticket]
        self._save(name, [ticket, *tickets])

    def pop(self, server_name: str) -> Any:
        """The newest valid ticket for this server, removed from the cache (single use)."""
        tickets = self._load(server_name)
        if not tickets:
            return None
        ticket, rest = tickets[0], tickets[1:]
        self._save(server_name, rest)
        return ticket
