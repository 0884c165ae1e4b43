"""The admin HTTP server: aiohttp on the Intermediate's own event loop.

Access control
--------------
* Bound to a loopback address, reads need no token. Bound anywhere else, every API request
  needs `Authorization: Bearer <token>` (the CLI refuses such a bind without
  `--admin-token-file`). The dashboard's static files carry no data and are always served.
* The write operations (drain a Connector, disconnect an identity) exist only when a token
  is configured, and always need it, on loopback too.
* Tokens are compared in constant time (`hmac.compare_digest` of their sha256). A missing or
  wrong token is a 401, one rate-limited log line and `ztna_admin_unauthorized_total`.

Every request is counted by route and status (`ztna_admin_requests_total`). Nothing here
touches the data plane: reads take a `Snapshot` (a copy built in one go), and the SSE stream
sends one per second per client, at most `MAX_EVENT_CLIENTS` clients at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from ztna.intermediate.admin import models
from ztna.intermediate.admin.snapshot import AdminSource
from ztna.metrics import MetricRow, MetricTable
from ztna.observe import RateLimitedLog

log = logging.getLogger("ztna.admin")

MAX_EVENT_CLIENTS = 16
EVENT_INTERVAL = 1.0
STATIC_FILES = {"index.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _json(body: BaseModel | list[Any] | dict[str, Any], status: int = 200) -> web.Response:
    if isinstance(body, BaseModel):
        text = body.model_dump_json()
    elif isinstance(body, list):
        text = "[" + ",".join(m.model_dump_json() for m in body) + "]"
    else:
        text = json.dumps(body)
    return web.Response(text=text, status=status, content_type="application/json",
                        headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> web.Response:
    return _json(models.ErrorBody(error=message), status)


class AdminServer:
    def __init__(self, source: AdminSource, *, token: bytes | None, reads_need_token: bool,
                 event_interval: float = EVENT_INTERVAL) -> None:
        self.source = source
        self._token_digest = hashlib.sha256(token).digest() if token is not None else None
        self.reads_need_token = reads_need_token
        self.event_interval = event_interval
        self.requests: dict[tuple[str, int], int] = {}
        self.unauthorized = 0
        self.event_clients = 0
        self._bad = RateLimitedLog(log)
        self._closing = asyncio.Event()   # ends the event streams, so a stop never waits on them
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._static = {name: resources.files("ztna.intermediate.admin").joinpath("static", name).read_bytes()
                        for name in STATIC_FILES}
        self.app = self._build_app()

    @property
    def writes_enabled(self) -> bool:
        return self._token_digest is not None

    # ------------------------------------------------------------------ app
    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._count, self._auth], client_max_size=4096)
        r = app.router
        r.add_get("/", self._index)
        r.add_get("/static/{name}", self._static_file)
        r.add_get("/api/v1/openapi.json", self._openapi)
        r.add_get("/api/v1/services", self._services)
        r.add_get("/api/v1/connections", self._connections)
        r.add_get("/api/v1/flows", self._flows)
        r.add_get("/api/v1/histograms", self._histograms)
        r.add_get("/api/v1/events", self._events)
        if self.writes_enabled:
            r.add_post("/api/v1/connectors/{id}/drain", self._drain)
            r.add_post("/api/v1/identities/{identity}/disconnect", self._disconnect)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.requests[(name, status)] = self.requests.get((name, status), 0) + 1

    @web.middleware
    async def _auth(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        path = request.path
        needs = request.method != "GET" or (self.reads_need_token and path.startswith("/api/"))
        if needs and not self._token_ok(request):
            self.unauthorized += 1
            peer = request.remote or "?"
            self._bad.warning("admin request without a valid token", f"{request.method} {path} from {peer}")
            return _error(401, "a valid token is required (Authorization: Bearer ...)")
        return await handler(request)

    def _token_ok(self, request: web.Request) -> bool:
        if self._token_digest is None:
            return False
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            given = ""
        return hmac.compare_digest(hashlib.sha256(given.strip().encode()).digest(), self._token_digest)

    # ------------------------------------------------------------------ handlers
    async def _index(self, request: web.Request) -> web.Response:
        return web.Response(body=self._static["index.html"], content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def _static_file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC_FILES:
            return _error(404, "no such file")
        return web.Response(body=self._static[name], content_type=STATIC_FILES[name],
                            headers={"Cache-Control": "no-store"})

    async def _openapi(self, request: web.Request) -> web.Response:
        return _json(models.openapi(writes=self.writes_enabled))

    async def _services(self, request: web.Request) -> web.Response:
        return _json(models.services(self.source.admin_snapshot()))

    async def _connections(self, request: web.Request) -> web.Response:
        return _json(models.connections(self.source.admin_snapshot()))

    async def _flows(self, request: web.Request) -> web.Response:
        return _json(models.flows(self.source.admin_snapshot()))

    async def _histograms(self, request: web.Request) -> web.Response:
        return _json(models.histograms(self.source.admin_snapshot()))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        if self.event_clients >= MAX_EVENT_CLIENTS:
            return _error(503, f"at most {MAX_EVENT_CLIENTS} live dashboards at a time")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-store"})
        self.event_clients += 1
        try:
            await response.prepare(request)
            while not self._closing.is_set():
                state = models.dashboard(self.source.admin_snapshot())
                await response.write(b"data: " + state.model_dump_json().encode() + b"\n\n")
                try:
                    await asyncio.wait_for(self._closing.wait(), self.event_interval)
                except TimeoutError:
                    pass
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.event_clients -= 1
        return response

    async def _drain(self, request: web.Request) -> web.Response:
        try:
            peer_id = int(request.match_info["id"])
        except ValueError:
            return _error(400, "the Connector id is a number (GET /api/v1/services)")
        try:
            raw = await request.read()
            body = models.DrainRequest.model_validate_json(raw) if raw.strip() else models.DrainRequest()
        except ValidationError as exc:
            return _error(400, f"bad body: {exc.errors()[0]['msg']}")
        if not self.source.drain_connector(peer_id, body.drain):
            return _error(404, f"no Connector with id {peer_id}")
        log.warning("admin: Connector %d %s", peer_id, "drained" if body.drain else "no longer drained")
        return _json(models.DrainResult(id=peer_id, draining=body.drain))

    async def _disconnect(self, request: web.Request) -> web.Response:
        identity = request.match_info["identity"]
        closed = self.source.disconnect_identity(identity)
        log.warning("admin: disconnected identity %r (%d connections)", identity, closed)
        return _json(models.DisconnectResult(identity=identity, closed=closed))

    # ------------------------------------------------------------------ runner
    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await self._site.start()

    @property
    def port(self) -> int:
        assert self._runner is not None
        for addr in self._runner.addresses:
            return int(addr[1])
        raise RuntimeError("admin server not started")

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def metrics(self) -> list[MetricRow]:
        t = MetricTable()
        for (route, status), n in sorted(self.requests.items()):
            t.counter("ztna_admin_requests_total", "Admin API requests by route and status", n,
                      {"route": route, "status": str(status)})
        t.counter("ztna_admin_unauthorized_total", "Admin requests refused for a missing or wrong token",
                  self.unauthorized)
        t.gauge("ztna_admin_event_clients", "Live dashboard event streams", self.event_clients)
        return t.rows
