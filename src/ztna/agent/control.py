"""Local control socket: `ztna status` reads the Agent's state without root.

A Unix stream socket `<state_dir>/<name>.sock`, mode 0666 (the state is not secret: it is
what `ip route` and `ss` would show anyway, and the socket accepts no commands). A client
connects, the Agent writes one JSON object and a newline, and closes. `query()` is the
client side used by the CLI and tests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ztna.errors import UsageError

log = logging.getLogger("ztna.agent")


class ControlServer:
    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self.snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.chmod(self.path.parent, 0o755)
        except OSError:
            pass
        if self.path.exists():
            # A live Agent answers; a dead one left its socket behind.
            try:
                query(self.path, timeout=0.5)
            except OSError:
                self.path.unlink()
            else:
                raise UsageError(
                    f"another Agent named {self.path.stem!r} is already running (its status socket "
                    f"{self.path} answers): stop it, or start this one with another --name or "
                    f"--state-dir")
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        os.chmod(self.path, 0o666)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(self.snapshot(), default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass
        except Exception:  # noqa: BLE001 - a status bug must not kill the Agent
            log.exception("status snapshot failed")
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def query(path: str | Path, *, timeout: float = 3.0) -> dict[str, Any]:
    """Blocking client: connect, read the JSON snapshot."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise OSError(f"bad answer from {path}: {exc}") from exc
