"""ztna.procs with real child processes: output lands in the log, readiness is polled while
the child is watched, and stop escalates from SIGTERM to SIGKILL."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from ztna import procs

PY = sys.executable


def test_spawn_logs_output_and_stop_returns_the_exit_status(tmp_path: Path) -> None:
    log = tmp_path / "child.log"
    child = procs.spawn([PY, "-c", "import sys,time\nprint('hello');print('oops',file=sys.stderr)\n"
                         "time.sleep(60)"], log=log)
    procs.wait_until(lambda: "oops" in log.read_text(), timeout=10, what="output",
                     watch=[child])
    assert log.read_text().splitlines() == ["hello", "oops"]
    assert procs.tail(log, 1) == "oops"
    assert procs.tail(log, chars=5) == "oops"  # the last 5 characters, stripped
    assert procs.stop(child) == -signal.SIGTERM
    assert procs.stop(child) == -signal.SIGTERM  # idempotent


def test_stop_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "stubborn.log"
    child = procs.spawn([PY, "-c", "import signal,time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                         "print('armed', flush=True)\ntime.sleep(60)"], log=log)
    procs.wait_until(lambda: "armed" in log.read_text(), timeout=10, what="armed", watch=[child])
    t0 = time.monotonic()
    assert procs.stop(child, grace=0.3) == -signal.SIGKILL
    assert time.monotonic() - t0 < 30


def test_stop_all_signals_every_child_first(tmp_path: Path) -> None:
    children = [procs.spawn([PY, "-c", "import time\ntime.sleep(60)"], log=tmp_path / f"{i}.log")
                for i in range(3)]
    procs.stop_all(children, grace=10)
    assert [c.returncode for c in children] == [-signal.SIGTERM] * 3


def test_wait_until_notices_a_dead_child_and_a_timeout(tmp_path: Path) -> None:
    log = tmp_path / "dies.log"
    child = procs.spawn([PY, "-c", "print('bye'); raise SystemExit(3)"], log=log)
    with pytest.raises(AssertionError, match=r"ready: process \d+ exited \(3\): bye"):
        procs.wait_until(lambda: None, timeout=30, what="ready", watch=[child],
                         error=AssertionError, detail=lambda: procs.tail(log))
    with pytest.raises(procs.ProcessFailure, match="never: not ready within 0 s"):
        procs.wait_until(lambda: False, timeout=0.1, what="never")
    calls = iter([OSError("not yet"), None, 7])

    def check() -> int | None:
        item = next(calls)
        if isinstance(item, Exception):
            raise item
        return item

    assert procs.wait_until(check, timeout=10, what="value", retry_on=(OSError,), interval=0) == 7


def test_spawn_runs_through_a_given_popen(tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def runner(argv: list[str], **kw: object):  # type: ignore[no-untyped-def]
        import subprocess
        seen.append(argv)
        return subprocess.Popen(argv, **kw)  # type: ignore[call-overload]

    log = tmp_path / "r.log"
    child = procs.spawn([PY, "-c", "print('via runner')"], log=log, popen=runner)
    assert child.wait(30) == 0
    assert seen == [[PY, "-c", "print('via runner')"]]
    assert log.read_text() == "via runner\n"
    with pytest.raises(ValueError):
        procs.spawn(["true"], log=log, popen=runner, netns="x")


def test_await_until_returns_the_value_or_raises_after_the_timeout() -> None:
    import asyncio

    from ztna.procs import await_until

    tries: list[int] = []

    async def third_try() -> int | None:
        tries.append(1)
        return len(tries) if len(tries) == 3 else None

    async def never() -> bool:
        return False

    async def main() -> None:
        assert await await_until(third_try, timeout=5, what="x", interval=0.01) == 3
        with pytest.raises(AssertionError, match="never: not ready within 0 s: the log"):
            await await_until(never, timeout=0.05, what="never", interval=0.01,
                              error=AssertionError, detail=lambda: "the log")

    asyncio.run(main())
