"""One Intermediate's membership in a cluster: the driver around the store.

`join()` (before the endpoints open) reads or creates the shared keys; the address-token key
and the stateless-reset key are then fixed for the life of the process, because the native
endpoint is built with them. `start()` runs the probe: every `limits.CLUSTER_PROBE_INTERVAL`
a PING, so an outage shows in /healthz and the metrics even when no handshake touched the
store, and a recovery turns session tickets back on without a restart. After a recovery the
member writes its keys back (`SET NX`): a store that came back empty (restarted without
persistence) gets the same keys again, so the members still agree.

Presence (`ztna.cluster.presence`): every `limits.CLUSTER_LEASE_REFRESH` the member publishes
what its registry holds (`local_presence`, a callable the Intermediate passes in) under a
lease and reads everyone's records into its `ClusterView`. A record that does not parse is
skipped, counted and logged (rate limited), and the others are still used. While the store is
down the view keeps the last records it read (their members may well be alive).

Each outage and each recovery is logged once; the failures are counted.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from ztna import limits
from ztna.cluster.health import StoreHealth
from ztna.cluster.presence import ClusterView, Presence
from ztna.cluster.store import ClusterStore, RedisStore, StoreUnavailable
from ztna.cluster.tickets import ClusterTicketStore
from ztna.cluster.url import StoreUrl, parse_store_url
from ztna.errors import DecodeError
from ztna.metrics import MetricRow
from ztna.observe import RateLimitedLog

log = logging.getLogger("ztna.cluster")

# name -> size in bytes of the secrets every member shares
SHARED_KEYS = {"address-token": 16, "stateless-reset": 32}

class ClusterMember:
    def __init__(self, url: str | StoreUrl, advertise: str, *, store: ClusterStore | None = None,
                 rng: Callable[[int], bytes] = secrets.token_bytes,
                 clock: Callable[[], float] = time.monotonic,
                 probe_interval: float = limits.CLUSTER_PROBE_INTERVAL,
                 local_presence: Callable[[], Presence] | None = None,
                 lease: float = limits.CLUSTER_LEASE,
                 lease_refresh: float = limits.CLUSTER_LEASE_REFRESH) -> None:
        self.url = url if isinstance(url, StoreUrl) else parse_store_url(url)
        self.advertise = advertise
        self.store: ClusterStore = store if store is not None else RedisStore(self.url)
        self.rng = rng
        self.clock = clock
        self.probe_interval = probe_interval
        self.health = StoreHealth(since=clock())
        self.keys: dict[str, bytes] = {}
        self.key_conflicts = 0
        self.tickets = ClusterTicketStore(self.store, self.health, clock=clock,
                                          on_outage=self._log_outage)
        self.local_presence = local_presence or (lambda: Presence(self.advertise))
        self.lease = lease
        self.lease_refresh = lease_refresh
        self.view = ClusterView(advertise)
        self.on_view: Callable[[], None] | None = None     # called after each refresh
        self.bad_records = 0
        self._bad = RateLimitedLog(log)
        self._task: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    async def join(self, timeout: float = limits.CLUSTER_JOIN_TIMEOUT) -> None:
        """Fetch (or create) the shared keys, retrying until `timeout`; StoreUnavailable then."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                for name, size in SHARED_KEYS.items():
                    self.keys[name] = await self.store.shared_secret(name, size, self.rng)
                break
            except StoreUnavailable as exc:
                if loop.time() >= deadline:
                    raise StoreUnavailable(
                        f"cluster store {self.url.redacted()} unreachable: {exc}") from None
                await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))
        log.info("joined cluster %s as %s", self.url.redacted(), self.advertise)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._probe())
        if self._presence_task is None:
            self._presence_task = asyncio.ensure_future(self._presence())

    async def close(self) -> None:
        for task in (self._task, self._presence_task):
            if task is not None:
                task.cancel()
        self._task = self._presence_task = None
        if self.health.up:
            try:        # the others drop this member now instead of when the lease runs out
                await self.store.withdraw_presence(self.advertise)
            except StoreUnavailable as exc:
                log.debug("withdrawing presence: %s", exc)
        try:
            await self.store.close()
        except Exception as exc:  # closing a dead connection may fail; nothing is lost
            log.debug("closing the cluster store: %s", exc)

    @property
    def address_token_key(self) -> bytes:
        return self.keys["address-token"]

    @property
    def reset_key(self) -> bytes:
        return self.keys["stateless-reset"]

    # ------------------------------------------------------------------ probe
    def _log_outage(self, error: str) -> None:
        log.warning("cluster store %s unreachable (%s): serving held sessions, refusing 0-RTT "
                    "and issuing no session tickets until it answers", self.url.redacted(), error)

    async def probe_once(self) -> None:
        try:
            await self.store.ping()
            if not self.health.up:
                await self._restore_keys()
        except StoreUnavailable as exc:
            if self.health.failed(self.clock(), str(exc)):
                self._log_outage(str(exc))
            return
        if self.health.succeeded(self.clock()):
            log.warning("cluster store %s answers again: session tickets and 0-RTT resumed",
                        self.url.redacted())

    async def _restore_keys(self) -> None:
        for name, mine in self.keys.items():
            def same(_size: int, value: bytes = mine) -> bytes:
                return value

            stored = await self.store.shared_secret(name, len(mine), same)
            if stored != mine:
                self.key_conflicts += 1
                log.error("cluster store holds another %s key than this member's: tokens and "
                          "resets of this member do not validate on the others until it restarts",
                          name)

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            await self.probe_once()

    # ------------------------------------------------------------------ presence
    async def refresh_presence(self) -> None:
        own = self.local_presence()
        try:
            await self.store.publish_presence(self.advertise, own.encode(), self.lease)
            raw = await self.store.read_presence()
        except StoreUnavailable as exc:
            if self.health.failed(self.clock(), str(exc)):
                self._log_outage(str(exc))
            self.view.apply(own, [p for m, p in self.view.records.items() if m != self.advertise])
            return
        remote: list[Presence] = []
        for data in raw:
            try:
                remote.append(Presence.decode(data))
            except DecodeError as exc:
                self.bad_records += 1
                self._bad.warning("unreadable presence record in the cluster store", str(exc))
        self.view.apply(own, remote)
        if self.on_view is not None:
            self.on_view()

    async def _presence(self) -> None:
        while True:
            await self.refresh_presence()
            await asyncio.sleep(self.lease_refresh)

    # ------------------------------------------------------------------ observability
    def health_detail(self) -> dict[str, Any]:
        h = self.health
        detail: dict[str, Any] = {
            "store": self.url.redacted(), "member": self.advertise,
            "store_up": h.up, "store_state_seconds": round(self.clock() - h.since, 3),
            "store_failures": h.failures, "zero_rtt_refused_store_down": self.tickets.stats.refused_store_down,
        }
        if not h.up:
            detail["store_error"] = h.last_error
        detail["members"] = self.view.members()
        detail["services"] = self.view.services()
        return detail

    def metrics(self) -> list[MetricRow]:
        h, t = self.health, self.tickets.stats
        return [
            ("ztna_cluster_store_up", "gauge", "1 while the cluster store answers", 1.0 if h.up else 0.0, None),
            ("ztna_cluster_store_failures_total", "counter", "Cluster store calls that failed", h.failures, None),
            ("ztna_cluster_store_outages_total", "counter", "Times the cluster store stopped answering",
             h.outages, None),
            ("ztna_cluster_key_conflicts_total", "counter",
             "Shared keys found different from this member's after a store recovery", self.key_conflicts, None),
            ("ztna_session_tickets_not_issued_total", "counter",
             "Session tickets not issued because the cluster store did not answer",
             t.not_issued_store_down, {"reason": "store_down"}),
            ("ztna_cluster_members", "gauge", "Members in this member's view (itself included)",
             len(self.view.records), None),
            ("ztna_cluster_bad_presence_records_total", "counter",
             "Presence records in the store that did not parse (skipped)", self.bad_records, None),
        ]
