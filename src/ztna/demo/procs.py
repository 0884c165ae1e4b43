"""Child processes of one demo run: start, watch, wait for readiness, kill.

Every component runs as ``python -m ztna ...`` (or ``python -m ztna.demo.backends``) with
stdout and stderr going to ``<tmp>/logs/<name>.log``. The mechanics (start with a log,
poll a readiness signal while watching for deaths, SIGTERM then SIGKILL) are
``ztna.procs``; this module keeps the demo's book of named children.
``Supervisor.stop_all()`` is idempotent and safe to call from ``finally``.

A readiness timeout or a death raises ``DemoError`` naming the component, what was awaited
and the tail of its log.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ztna import procs
from ztna.procs import ztna_argv

__all__ = ["Child", "DemoError", "LOG_TAIL_LINES", "Supervisor", "ztna_argv"]

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
        log = self.log_dir / f"{name}.log"
        popen = procs.spawn(argv, log=log, append=True, popen=runner,
                            netns=None if runner is not None else netns)
        child = Child(name, argv, popen, log)
        self.children[name] = child
        return child

    def tail(self, name: str, lines: int = LOG_TAIL_LINES) -> str:
        child = self.children.get(name) or next((c for c in self._retired if c.name == name), None)
        if child is None:
            return "(no log)"
        return procs.tail(child.log, lines)

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
        last: list[BaseException] = []

        def probe() -> T | None:
            try:
                result = check()
            except (OSError, ValueError, KeyError) as exc:
                last[:] = [exc]
                result = None
            if result is None:
                self.check_all_alive()  # a dead component raises its own DemoError
            return result

        def fail(_message: str) -> DemoError:
            detail = f" (last error: {last[0]})" if last else ""
            return DemoError(f"{component}: timed out after {timeout:.0f}s waiting for "
                             f"{what}{detail}; last log lines:\n{self.tail(component)}")

        return procs.wait_until(probe, timeout=timeout, what=what, interval=interval, error=fail)

    def stop(self, name: str, *, grace: float = 3.0) -> int | None:
        """Terminate one child and wait for it; returns its exit status."""
        child = self.children.pop(name)
        self._retired.append(child)
        return procs.stop(child.popen, grace=grace)

    def retire(self, name: str) -> None:
        self.stop(name)

    def stop_all(self, *, grace: float = 3.0) -> None:
        # Agent first (it sends GoAway and removes its TUN), then the rest.
        order = sorted(self.children, key=lambda n: 0 if n.startswith("agent") else 1)
        procs.stop_all([self.children[name].popen for name in order], grace=grace)
        self._retired.extend(self.children.values())
        self.children.clear()

    def pids(self) -> dict[str, int]:
        return {name: c.popen.pid for name, c in self.children.items()}
