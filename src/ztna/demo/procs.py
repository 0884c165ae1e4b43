"""Child processes of one demo run: start, watch, wait for readiness, kill.

Every component runs as ``python -m ztna ...`` (or ``python -m ztna.demo.backends``) with
stdout and stderr going to ``<tmp>/logs/<name>.log``. A process started inside a network
namespace is prefixed with ``ip netns exec NS`` (which execs, so the PID is the program's
own). ``Supervisor.stop_all()`` sends SIGTERM, waits, then SIGKILLs what is left; it is
idempotent and safe to call from ``finally``.

Readiness never sleeps a fixed time: ``wait_for(check, timeout, component, what)`` polls a
real signal and, while polling, notices a component that died. A timeout or death raises
``DemoError`` naming the component, what was awaited and the tail of its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

LOG_TAIL_LINES = 12


class DemoError(Exception):
    """A demo step failed; the message says which component and why (with its log tail)."""


@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log: Path
    spawned_at: float = field(default_factory=time.monotonic)


def ztna_argv(*args: str) -> list[str]:
    """``python -m ztna ARGS`` with this interpreter (works without the venv on PATH)."""
    return [sys.executable, "-m", "ztna", *args]


class Supervisor:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}
        self._retired: list[Child] = []

    def spawn(self, name: str, argv: list[str], *, netns: str | None = None,
              runner: Callable[..., subprocess.Popen[bytes]] | None = None) -> Child:
        """Start ``argv`` (in ``netns`` if given; ``runner(argv, **popen_kw)`` overrides)."""
        if name in self.children:
            self.retire(name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "ab") as f:
            kw: dict[str, Any] = {"stdout": f, "stderr": subprocess.STDOUT,
                                  "stdin": subprocess.DEVNULL, "env": env}
            if runner is not None:
                popen = runner(argv, **kw)
            else:
                full = ["ip", "netns", "exec", netns, *argv] if netns else argv
                popen = subprocess.Popen(full, **kw)
        child = Child(name, argv, popen, log)
        self.children[name] = child
        return child

    def tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        child = self.children.get(name) or next((c for c in self._retired if c.name == name), None)
        if child is None:
            return "(no log)"
        try:
            text = child.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.strip().splitlines()[-lines:]) or "(log is empty)"

    def check_alive(self, name: str) -> None:
        child = self.children[name]
        code = child.popen.poll()
        if code is not None:
            raise DemoError(f"{name} exited with status {code}; last log lines:\n{self.tail(name)}")

    def check_all_alive(self) -> None:
        for name in list(self.children):
            self.check_alive(name)

    def wait_for(self, check: Callable[[], T | None], *, timeout: float, component: str,
                 what: str, interval: float = 0.05) -> T:
        """Poll ``check`` until it returns non-None (exceptions count as 'not yet')."""
        deadline = time.monotonic() + timeout
        last_exc: BaseException | None = None
        while True:
            try:
                result = check()
                if result is not None:
                    return result
            except (OSError, ValueError, KeyError) as exc:
                last_exc = exc
            self.check_all_alive()
            if time.monotonic() > deadline:
                detail = f" (last error: {last_exc})" if last_exc else ""
                raise DemoError(f"{component}: timed out after {timeout:.0f}s waiting for "
                                f"{what}{detail}; last log lines:\n{self.tail(component)}")
            time.sleep(interval)

    def stop(self, name: str, *, grace: float = 3.0) -> int | None:
        """Terminate one child and wait for it; returns its exit status."""
        child = self.children.pop(name)
        self._retired.append(child)
        return _terminate(child.popen, grace)

    def retire(self, name: str) -> None:
        self.stop(name)

    def stop_all(self, *, grace: float = 3.0) -> None:
        # Agent first (it sends GoAway and removes its TUN), then the rest.
        order = sorted(self.children, key=lambda n: 0 if n.startswith("agent") else 1)
        for name in order:
            child = self.children[name]
            if child.popen.poll() is None:
                try:
                    child.popen.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for name in order:
            _terminate(self.children[name].popen, grace)
        self._retired.extend(self.children.values())
        self.children.clear()

    def pids(self) -> dict[str, int]:
        return {name: c.popen.pid for name, c in self.children.items()}


def _terminate(popen: subprocess.Popen[bytes], grace: float) -> int | None:
    if popen.poll() is None:
        try:
            popen.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            popen.kill()
            try:
                popen.wait(timeout=2)
            except subprocess.TimeoutExpired:
                return None
    return popen.returncode
