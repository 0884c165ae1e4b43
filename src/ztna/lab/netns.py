"""Low-level namespace and process helpers for the lab (Linux, root).

* ``setns`` via ctypes: Python 3.11 has no ``os.setns``. It switches only the calling
  thread, so ``in_netns`` runs a function in a short-lived thread and never touches
  the caller's own namespace. Sysctls are written that way: ``/proc/sys/net`` shows
  the namespace of the thread that opens it, which saves one fork per node.
* Processes are identified by ``(pid, start_time)`` (field 22 of ``/proc/PID/stat``)
  so a recycled PID is never killed by mistake; a zombie counts as gone (never
  ``waitpid(-1)``: that would steal other code's child exit statuses).
* ``netns_pids`` is ``ip netns pids`` in Python: every process whose
  ``/proc/PID/ns/net`` is the same inode as ``/run/netns/NAME``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

from ztna.errors import UsageError

NETNS_DIR: Final = "/run/netns"
CLONE_NEWNET: Final = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def setns(path: str) -> None:
    """Move the calling *thread* into the network namespace at ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that first enters namespace ``ns``."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            setns(os.path.join(NETNS_DIR, ns))
            box["ok"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["err"] = exc

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]  # type: ignore[misc]  # always a BaseException, set above
    return box["ok"]  # type: ignore[return-value]  # fn's result, set above


def write_sysctls(ns: str, values: dict[str, str]) -> None:
    def write() -> None:
        for key, value in values.items():
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)

    if values:
        in_netns(ns, write)


def run(argv: list[str], *, stdin: str | None = None, timeout: float = 30) -> str:
    """Run a setup command; raise UsageError with its stderr on failure."""
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise UsageError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def ns_exists(ns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, ns))


def netns_pids(ns: str) -> list[int]:
    try:
        target = os.stat(os.path.join(NETNS_DIR, ns))
    except FileNotFoundError:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:  # gone, zombie, or kernel thread
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


def start_time(pid: int) -> int | None:
    """Start time in clock ticks, or None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # the command name may contain spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, start: int | None) -> bool:
    now = start_time(pid)
    return now is not None and (start is None or now == start)


def terminate(procs: Iterable[tuple[int, int | None]], *, grace: float = 2.0) -> list[int]:
    """SIGTERM, wait up to ``grace`` s, then SIGKILL; returns PIDs that still live."""
    todo = [(pid, st) for pid, st in procs if alive(pid, st)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for pid, _ in todo:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while todo and time.monotonic() < deadline:
            todo = [(pid, st) for pid, st in todo if alive(pid, st)]
            if todo:
                time.sleep(0.02)
        if not todo:
            break
    return [pid for pid, _ in todo]

