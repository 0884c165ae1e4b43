"""Namespace + process helpers shared by the Agent's root tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ztna import procs

PY = sys.executable
HERE = Path(__file__).parent


@contextmanager
def netns(name: str) -> Iterator[str]:
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nsexec(ns: str, *argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def spawn(ns: str, *argv: str, log: Path) -> subprocess.Popen[bytes]:
    return procs.spawn(list(argv), log=log, netns=ns)


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    procs.wait_until(lambda: bool(predicate()) or None, timeout=timeout,
                     what=f"timed out waiting for {what}", error=AssertionError)


def stop(proc: subprocess.Popen[bytes], sig: int = 15) -> None:
    procs.stop(proc, grace=10, sig=sig)
