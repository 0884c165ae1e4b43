"""Child processes for the demo, the benchmarks and the tests: one way to start, watch,
wait for and stop them.

A child is started with ``spawn``: its stdout and stderr go to one log file (the parent's
handle is closed at once, the child keeps its own), stdin is ``/dev/null`` and
``PYTHONUNBUFFERED=1`` is set so a Python child's log is current. ``popen`` replaces
``subprocess.Popen`` for a caller that starts children elsewhere (``Lab.spawn`` bound to a
node, a demo layout's namespace runner); ``netns`` prefixes ``ip netns exec NS``, which
execs, so the PID is the program's own.

Readiness never sleeps a fixed time: ``wait_until(check, ...)`` polls a real signal and,
while polling, notices a watched child that died; either failure raises the caller's
exception type with a message naming what was awaited. ``stop`` is SIGTERM, a grace
period, then SIGKILL, and returns the exit status (``None`` if even SIGKILL did not reap
it); ``stop_all`` signals every child first so they shut down in parallel. Both are
idempotent and safe in ``finally``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["ProcessFailure", "child_env", "spawn", "stop", "stop_all", "tail", "wait_until", "await_until",
           "ztna_argv"]

T = TypeVar("T")

# How long a SIGKILLed child may take to be reaped before we give up on it.
KILL_REAP_S = 5.0


class ProcessFailure(Exception):
    """A child died, or what we waited for did not happen in time (the default error)."""


def ztna_argv(*args: str) -> list[str]:
    """``python -m ztna ARGS`` with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "ztna", *args]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, unbuffered Python output, plus ``extra``."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}


def spawn(argv: list[str], *, log: Path | str, netns: str | None = None,
          env: Mapping[str, str] | None = None, append: bool = False,
          popen: Callable[..., subprocess.Popen[Any]] | None = None,
          **popen_kw: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` with stdout+stderr to ``log`` (truncated unless ``append``).

    ``env`` replaces the default ``child_env()``; ``popen(argv, **kw)`` replaces
    ``subprocess.Popen`` (and then ``netns`` must be None: the runner places the child)."""
    if netns is not None and popen is not None:
        raise ValueError("give netns or popen, not both")
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"stdin": subprocess.DEVNULL, "stderr": subprocess.STDOUT,
                          "env": dict(env) if env is not None else child_env()}
    kw.update(popen_kw)
    full = ["ip", "netns", "exec", netns, *argv] if netns else argv
    with open(log, "ab" if append else "wb") as fh:
        kw["stdout"] = fh
        return (popen or subprocess.Popen)(full, **kw)


def stop(proc: subprocess.Popen[Any], *, grace: float = 3.0,
         sig: int | None = signal.SIGTERM) -> int | None:
    """Send ``sig`` (None: none, just wait), wait ``grace`` s, then SIGKILL; exit status."""
    if proc.poll() is None:
        if sig is not None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout=KILL_REAP_S)
            except subprocess.TimeoutExpired:
                return None
    return proc.returncode


def stop_all(procs: Iterable[subprocess.Popen[Any]], *, grace: float = 3.0,
             sig: int = signal.SIGTERM) -> None:
    """Signal every child that still runs, then ``stop`` each in the given order."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
    for proc in procs:
        stop(proc, grace=grace, sig=None)


def tail(log: Path | str, lines: int = 12, *, chars: int | None = None) -> str:
    """The last ``lines`` lines (or last ``chars`` characters) of a log, or a placeholder."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return "(no log)"
    if chars is not None:
        return text[-chars:].strip()
    return "\n".join(text.strip().splitlines()[-lines:]) or "(log is empty)"


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str,
               interval: float = 0.05, watch: Iterable[subprocess.Popen[Any]] = (),
               retry_on: tuple[type[BaseException], ...] = (),
               error: Callable[[str], BaseException] = ProcessFailure,
               detail: Callable[[], str] | None = None) -> T:
    """Poll ``check`` until it returns neither None nor False, and return that.

    Exceptions in ``retry_on`` count as 'not yet'. A child in ``watch`` that exits, or the
    deadline, raises ``error(message)``; ``detail()`` (a log tail, say) is appended."""
    deadline = time.monotonic() + timeout
    watched = list(watch)
    last_exc: BaseException | None = None
    while True:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except retry_on as exc:
            last_exc = exc
        for proc in watched:
            if proc.poll() is not None:
                extra = f": {detail()}" if detail else ""
                raise error(f"{what}: process {proc.pid} exited ({proc.returncode}){extra}")
        if time.monotonic() > deadline:
            why = f" (last error: {last_exc})" if last_exc else ""
            extra = f": {detail()}" if detail else ""
            raise error(f"{what}: not ready within {timeout:.0f} s{why}{extra}")
        time.sleep(interval)


async def await_until(check: Callable[[], Awaitable[T | None | bool]], *, timeout: float, what: str,
                      interval: float = 0.2,
                      error: Callable[[str], BaseException] = ProcessFailure,
                      detail: Callable[[], str] | None = None) -> T:
    """`wait_until` for a coroutine check, polled from a running event loop (so the loop
    keeps serving the test's own sockets between tries)."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None and result is not False:
            return result  # type: ignore[return-value]
        if time.monotonic() > deadline:
            extra = f": {detail()}" if detail else ""
            raise error(f"{what}: not ready within {timeout:.0f} s{extra}")
        await asyncio.sleep(interval)
