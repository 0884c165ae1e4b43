"""Session tickets for resumption and 0-RTT, with replay protection.

Server side — `ServerTicketStore`
---------------------------------
rustls' TLS 1.3 tickets are *stateful* here: the ticket on the wire is a random label and the
server keeps the resumption state. rustls hands both to this store (`put`), and asks for them
back with `take` when a client resumes. We keep them in SQLite (file mode 0600), which gives:

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
  Intermediates on different hosts share a Redis instead (`ztna.cluster.tickets`, the same
  put/take over an atomic GETDEL).
* **Identity**: the resumption state holds the client's certificate chain from the full
  handshake; the endpoint verifies it again (`ztna.identity`) before any early data is used.

Client side
-----------
Tickets a client receives stay in its native TLS configuration, in memory, one per identity
for the life of the process (`ztna.quic.config`): a reconnect after a server restart or a
path change resumes in 0-RTT; a new process starts with a full handshake.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
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
        # rustls asks for tickets on the thread that drives the endpoint, which need not
        # be the one that made the store: one connection, used under one lock.
        self._lock = threading.RLock()
        self.db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0, check_same_thread=False)
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

    @property
    def epoch(self) -> int:
        with self._lock:
            return int(self.db.execute("SELECT v FROM meta WHERE k='epoch'").fetchone()[0])

    def rotate(self) -> int:
        """Start a new key epoch; tickets two epochs old are refused from now on."""
        with self._lock:
            self.db.execute("UPDATE meta SET v = v + 1 WHERE k='epoch'")
            epoch = self.epoch
            self.db.execute("DELETE FROM tickets WHERE epoch < ?", (epoch - 1,))
        log.info("session ticket epoch rotated to %d", epoch)
        return epoch

    # -- called by rustls (through the native endpoint) -------------------------------
    def put(self, label: bytes, value: bytes) -> bool:
        """A ticket was issued: keep its resumption state under its label."""
        with self._lock:
            self.db.execute(
                "INSERT OR REPLACE INTO tickets VALUES (?, ?, ?, ?, ?)",
                (bytes(label), bytes(value), "null", self.clock(), self.epoch),
            )
            self.stats.issued += 1
            if self.stats.issued % 1000 == 0:
                self._purge()
        return True

    def take(self, label: bytes) -> bytes | None:
        """The resumption state of a ticket, deleted as it is returned (single use)."""
        with self._lock:
            row = self.db.execute(
                "DELETE FROM tickets WHERE label = ? RETURNING ticket, issued, epoch", (bytes(label),)
            ).fetchone()
            current = self.epoch
        if row is None:
            self.stats.refused_unknown += 1
            return None
        blob, issued, epoch = row
        if self.clock() - issued > self.max_age:
            self.stats.refused_expired += 1
            return None
        if epoch < current - 1:
            self.stats.refused_rotated += 1
            return None
        self.stats.resumed += 1
        return bytes(blob)

    def _purge(self) -> None:
        self.db.execute("DELETE FROM tickets WHERE issued < ?", (self.clock() - self.max_age,))
        count = self.db.execute("SELECT COUNT(*) FROM tickets").fetchone()[0]
        if count > self.max_tickets:
            self.db.execute(
                "DELETE FROM tickets WHERE label IN (SELECT label FROM tickets ORDER BY issued LIMIT ?)",
                (count - self.max_tickets,),
            )

    def close(self) -> None:
        with self._lock:
            self.db.close()
