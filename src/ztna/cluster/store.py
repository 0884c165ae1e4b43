"""The cluster store: what the members share, behind a small Protocol, and its Redis
implementation (redis-py).

Two kinds of call, with two clients:

* the ticket calls (`put_ticket`, `take_ticket`) are synchronous: the native TLS code asks for
  a ticket in the middle of a handshake and needs the answer before it can go on. They use a
  blocking client whose connect and read timeouts are tight (`limits.CLUSTER_TICKET_TIMEOUT`,
  0.1 s), without retries, so a slow or dead store can hold the event loop for that long once;
  after that the ticket backend does not call the store at all until a probe finds it back
  (`ztna.cluster.tickets`).
* everything else (`shared_secret`, `ping`) is asyncio, off the handshake path.

Keys live under `ztna:` in the URL's database: `ztna:key:<name>` (shared secrets, no expiry),
`ztna:ticket:<label hex>` (resumption state, expiring after the ticket lifetime) and
`ztna:presence:<member>` (a member's presence record, expiring with its lease).
The store holds secrets (resumption state, the token and reset keys): it must be private to the
Intermediates, with a password (`redis://:PASSWORD@HOST…`) and TLS (`rediss://`) across hosts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from ztna import limits
from ztna.cluster.url import StoreUrl

PREFIX = "ztna:"


class StoreUnavailable(Exception):
    """The store did not answer (refused, timed out, or failed): the caller decides safely."""


class ClusterStore(Protocol):
    def put_ticket(self, label: bytes, value: bytes, ttl: float) -> None: ...

    def take_ticket(self, label: bytes) -> bytes | None: ...

    async def shared_secret(self, name: str, size: int, rng: Callable[[int], bytes]) -> bytes: ...

    async def ping(self) -> None: ...

    async def publish_presence(self, member: str, record: bytes, lease: float) -> None: ...

    async def read_presence(self) -> list[bytes]: ...

    async def withdraw_presence(self, member: str) -> None: ...

    async def close(self) -> None: ...


def _ticket_key(label: bytes) -> str:
    return f"{PREFIX}ticket:{bytes(label).hex()}"


class RedisStore:
    """`ClusterStore` on one Redis server (standalone or behind a proxy)."""

    def __init__(self, url: StoreUrl, *, ticket_timeout: float = limits.CLUSTER_TICKET_TIMEOUT,
                 timeout: float = limits.CLUSTER_STORE_TIMEOUT) -> None:
        self.url = url
        no_retry = Retry(NoBackoff(), 0)
        self._sync = redis.Redis.from_url(
            url.url, socket_timeout=ticket_timeout, socket_connect_timeout=ticket_timeout,
            retry=no_retry, retry_on_timeout=False, health_check_interval=0,
        )
        self._async = redis.asyncio.Redis.from_url(
            url.url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0), retry_on_timeout=False,
        )

    # -- synchronous: called from the TLS handshake ---------------------------------------
    def put_ticket(self, label: bytes, value: bytes, ttl: float) -> None:
        try:
            self._sync.set(_ticket_key(label), bytes(value), px=max(1, int(ttl * 1000)))
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    def take_ticket(self, label: bytes) -> bytes | None:
        try:
            value = self._sync.getdel(_ticket_key(label))
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        if value is None:
            return None
        assert isinstance(value, bytes)     # decode_responses is off: replies are bytes
        return value

    # -- asynchronous ---------------------------------------------------------------------
    async def shared_secret(self, name: str, size: int, rng: Callable[[int], bytes]) -> bytes:
        """The cluster's secret `name`: created by the first member to ask (SET NX, so two
        members starting together still agree), read by everyone after."""
        key = f"{PREFIX}key:{name}"
        try:
            await self._async.set(key, rng(size), nx=True)
            value = await self._async.get(key)
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(value, bytes) or len(value) != size:
            raise StoreUnavailable(f"shared key {key} is missing or not {size} bytes long")
        return value

    async def ping(self) -> None:
        try:
            await self._async.ping()
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def publish_presence(self, member: str, record: bytes, lease: float) -> None:
        try:
            await self._async.set(f"{PREFIX}presence:{member}", record, px=max(1, int(lease * 1000)))
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def read_presence(self) -> list[bytes]:
        """Every live presence record (expired leases are gone from the store)."""
        try:
            keys = [k async for k in self._async.scan_iter(match=f"{PREFIX}presence:*", count=1000)]
            values = await self._async.mget(keys) if keys else []
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None
        return [v for v in values if isinstance(v, bytes)]

    async def withdraw_presence(self, member: str) -> None:
        try:
            await self._async.delete(f"{PREFIX}presence:{member}")
        except (redis.RedisError, OSError) as exc:
            raise StoreUnavailable(f"{type(exc).__name__}: {exc}") from None

    async def close(self) -> None:
        self._sync.close()
        await self._async.aclose()
