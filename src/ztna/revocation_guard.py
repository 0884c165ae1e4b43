"""The drivers' side of revocation: the deny-list file, its reload and the connections it ends.

One `RevocationGuard` per server (the Intermediate, the Connector's P2P server). The endpoint
asks `admit(identity)` for every verified client (a full handshake or a resumed session,
before any of its data is used); `reload()` reads the file again (SIGHUP) and `sweep()` closes
every live connection whose identity the new list revokes, with the list's reason as the
CONNECTION_CLOSE reason. A reload that fails keeps the old list (one error line, counted).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ztna.metrics import MetricRow, MetricTable
from ztna.revocation import RevocationFileError, RevocationList, load_revocations

if TYPE_CHECKING:
    from ztna.identity import Identity
    from ztna.quic.connection import ZtnaConnection

log = logging.getLogger("ztna.revocation")


class RevocationGuard:
    def __init__(self, path: str | Path | None, *, close_code: int) -> None:
        self.path = Path(path) if path is not None else None
        self.close_code = close_code
        # Read at start: a missing or bad file is a configuration error for the caller.
        self.current = load_revocations(self.path) if self.path is not None else RevocationList()
        self.refused = 0
        self.closed = 0
        self.reloads = 0
        self.reload_failures = 0

    def admit(self, identity: Identity) -> str | None:
        """None to let the peer in, else the close reason (counted as refused)."""
        reason = self.current.reason(identity)
        if reason is not None:
            self.refused += 1
        return reason

    def reload(self) -> bool:
        if self.path is None:
            return False
        try:
            self.current = load_revocations(self.path)
        except RevocationFileError as exc:
            self.reload_failures += 1
            log.error("revocation list reload failed, keeping the old one: %s", exc)
            return False
        self.reloads += 1
        log.info("revocation list %s reloaded: %d entries", self.path, len(self.current))
        return True

    def sweep(self, conns: Iterable[ZtnaConnection]) -> int:
        """Close every connection whose verified identity is revoked now."""
        ended = 0
        for conn in list(conns):
            # Only the peers that connected to us: our own client connections (a Connector's
            # QAD link to the Intermediate) carry the server's identity.
            if conn.closed or conn.identity is None or conn.is_client:
                continue
            reason = self.current.reason(conn.identity)
            if reason is None:
                continue
            log.warning("closing %s: %s", conn.label or conn.identity.common_name, reason)
            conn.close(self.close_code, reason)
            ended += 1
        self.closed += ended
        return ended

    def metrics(self) -> list[MetricRow]:
        t = MetricTable()
        t.counters_by("ztna_revocations_total", "Revocations enforced: handshakes refused, live connections closed",
                      "action", (("refused", self.refused), ("closed", self.closed)))
        t.gauge("ztna_revocation_list_entries", "Entries in the revocation list", len(self.current))
        t.counters_by("ztna_revocation_reloads_total", "Revocation list reloads", "result",
                      (("ok", self.reloads), ("failed", self.reload_failures)))
        return t.rows
