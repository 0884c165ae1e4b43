"""The TUN device and its split-tunnel routes, with crash-safe cleanup.

Theory of operation
-------------------
* The device is opened with the raw `TUNSETIFF` ioctl on /dev/net/tun (IFF_TUN | IFF_NO_PI:
  every read is exactly one IP packet, no packet-information prefix). It is not persistent,
  so the kernel deletes it — and every route through it — when the last fd closes.
* Addresses (the Agent's own /32 and /128) and one route per service virtual IP (IPv4 /32,
  IPv6 /128), plus the synthetic pools when services are reached by DNS name, are added
  over netlink with pyroute2; nothing else is routed (split tunnel). The netlink steps
  (start, MTU change, exit, crash recovery) run in a short-lived helper process
  (`ztna.agent.tun_netlink`), so the Agent's steady state holds no netlink library.
* Before touching the system we write a state file (`<state_dir>/<name>.json`) that says
  what we are about to create, with our pid. `close()` removes everything and the file.
  After SIGKILL the file survives: the next start (`recover_stale`) sees a dead pid and
  removes the routes and the device if they still exist (a device can outlive us when its fd
  leaked into a child process), then proceeds. A live pid means another Agent owns the name:
  refuse rather than fight over it. nftables tables the Agent adds (`--tcp-transport stream`
  redirect, `record_nft_table`) are listed in the same file and deleted the same way.
* Everything is netlink on the current network namespace, so it works inside `ip netns exec`.
* These methods are blocking (they wait for the helper) and must be called from a worker
  thread (`asyncio.to_thread`) by async code.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

from ztna.errors import UsageError

log = logging.getLogger("ztna.agent")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IPV6_MIN_MTU = 1280
NETLINK_TIMEOUT = 30.0   # s for one helper run


def _netlink(op: str, **req: Any) -> dict[str, Any]:
    """Run one netlink step in the helper process; its JSON answer."""
    try:
        proc = subprocess.run([sys.executable, "-m", "ztna.agent.tun_netlink", json.dumps({"op": op, **req})],
                              capture_output=True, text=True, timeout=NETLINK_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"netlink helper ({op}) did not run: {exc}") from exc
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"netlink helper ({op}) failed: {tail[0]}")
    answer: dict[str, Any] = json.loads(proc.stdout)
    return answer


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie or a recycled pid that is not an agent: check the command line.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ztna" in cmdline or b"python" in cmdline


class TunDevice:
    """A configured TUN device. `fd` is non-blocking; read/write whole IP packets."""

    def __init__(self, name: str, state_file: Path) -> None:
        self.name = name
        self.state_file = state_file
        self.fd = -1
        self.index = 0
        self.mtu = 0
        self.addresses: list[str] = []
        self.routes: list[str] = []
        self.nft_tables: list[str] = []     # "inet <name>" tables to delete after a crash

    # ------------------------------------------------------------------ crash recovery
    @staticmethod
    def recover_stale(state_file: Path) -> bool:
        """Remove what a dead Agent left behind. True if something was cleaned."""
        try:
            state = json.loads(state_file.read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            log.warning("unreadable state file %s; removing it", state_file)
            state_file.unlink(missing_ok=True)
            return False
        pid = int(state.get("pid", 0))
        if pid != os.getpid() and _pid_alive(pid):
            raise UsageError(f"another Agent (pid {pid}) owns {state.get('tun')!r} ({state_file}): "
                             "stop it, or start this one with another --name or --state-dir")
        answer = _netlink("recover", tun=state.get("tun"), routes=state.get("routes", []))
        cleaned = bool(answer.get("cleaned"))
        for warning in answer.get("warnings", []):
            log.warning("%s", warning)
        for table in state.get("nft_tables", []):
            if delete_nft_table(table):
                cleaned = True
        state_file.unlink(missing_ok=True)
        if cleaned:
            log.warning("removed stale device/routes/rules left by a previous Agent (pid %d)", pid)
        return cleaned

    # ------------------------------------------------------------------ setup
    def open(self, *, v4: str, v6: str, virtual_ips: list[str], mtu: int) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.recover_stale(self.state_file)
        self.routes = list(virtual_ips)
        self._write_state()   # before creating anything: a crash in between is recoverable
        try:
            self._create(v4=v4, v6=v6, mtu=mtu)
        except BaseException:
            self.close()
            raise

    def _create(self, *, v4: str, v6: str, mtu: int) -> None:
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise UsageError(f"cannot open /dev/net/tun: {exc.strerror} (TUN mode needs root/CAP_NET_ADMIN)") from exc
        ifr = struct.pack("16sH", self.name.encode(), IFF_TUN | IFF_NO_PI)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise UsageError("TUN mode needs root or CAP_NET_ADMIN (or use --mode userspace)") from exc
            if exc.errno == errno.EBUSY:
                raise UsageError(f"device {self.name} exists and is in use") from exc
            raise
        self.fd = fd
        answer = _netlink("configure", tun=self.name, v4=v4, v6=v6, mtu=mtu, routes=self.routes)
        self.index = int(answer.get("index") or 0)
        self.addresses = list(answer.get("addresses", []))
        if "error" in answer:
            raise RuntimeError(answer["error"])
        self.mtu = mtu
        for warning in answer.get("warnings", []):
            log.warning("%s", warning)
        log.info("%s up: mtu %d, %s, routes %s", self.name, mtu, " ".join(self.addresses), " ".join(self.routes))

    def _write_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "tun": self.name, "routes": self.routes,
                                   "nft_tables": self.nft_tables}))
        os.replace(tmp, self.state_file)

    def record_nft_table(self, table: str) -> None:
        """Note an `inet` nftables table before creating it (crash cleanup deletes it)."""
        if table not in self.nft_tables:
            self.nft_tables.append(table)
            self._write_state()

    def set_mtu(self, mtu: int) -> None:
        if self.fd < 0 or mtu == self.mtu:
            return
        if mtu < IPV6_MIN_MTU and any(":" in r for r in self.routes):
            log.warning("%s: mtu %d < 1280 removes IPv6 from the device; keeping 1280", self.name, mtu)
            mtu = IPV6_MIN_MTU
        try:
            error = _netlink("set_mtu", index=self.index, mtu=mtu).get("error")
        except RuntimeError as exc:
            error = str(exc)
        if error:
            log.warning("%s: cannot set mtu %d: %s", self.name, mtu, error)
            return
        log.info("%s: mtu %d -> %d (live DATAGRAM maximum)", self.name, self.mtu, mtu)
        self.mtu = mtu

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        try:
            if self.fd >= 0:
                # The device is not persistent: closing the last fd deletes it and every
                # route through it. Only if it survived (an fd leaked into a child) does
                # the helper remove it.
                os.close(self.fd)
                self.fd = -1
            if self.index and Path(f"/sys/class/net/{self.name}").exists():
                _netlink("close", tun=self.name, index=self.index, routes=self.routes)
        except RuntimeError as exc:
            log.warning("%s: cleanup incomplete: %s", self.name, exc)
        finally:
            self.state_file.unlink(missing_ok=True)
        log.info("%s removed with its routes", self.name)


def delete_nft_table(table: str) -> bool:
    """Delete `table inet <table>` if it exists; True if it did (blocking: nft binary)."""
    try:
        proc = subprocess.run(["nft", "delete", "table", "inet", table], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("cannot run nft to delete table %s: %s", table, exc)
        return False
    return proc.returncode == 0
