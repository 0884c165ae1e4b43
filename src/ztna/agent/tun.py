"""The TUN device and its split-tunnel routes, with crash-safe cleanup.

Theory of operation
-------------------
* The device is opened with the raw `TUNSETIFF` ioctl on /dev/net/tun (IFF_TUN | IFF_NO_PI:
  every read is exactly one IP packet, no packet-information prefix). It is not persistent,
  so the kernel deletes it — and every route through it — when the last fd closes.
* Addresses (the Agent's own /32 and /128) and one route per service virtual IP (IPv4 /32,
  IPv6 /128), plus the synthetic pools when services are reached by DNS name, are added
  over netlink with pyroute2; nothing else is routed (split tunnel).
* Before touching the system we write a state file (`<state_dir>/<name>.json`) that says
  what we are about to create, with our pid. `close()` removes everything and the file.
  After SIGKILL the file survives: the next start (`recover_stale`) sees a dead pid and
  removes the routes and the device if they still exist (a device can outlive us when its fd
  leaked into a child process), then proceeds. A live pid means another Agent owns the name:
  refuse rather than fight over it. nftables tables the Agent adds (`--tcp-transport stream`
  redirect, `record_nft_table`) are listed in the same file and deleted the same way.
* Everything is netlink on the current network namespace, so it works inside `ip netns exec`.
* pyroute2 0.9's synchronous `IPRoute` runs its own asyncio loop, so these methods are
  blocking and must be called from a worker thread (`asyncio.to_thread`) by async code; each
  call opens and closes its own netlink socket.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import json
import logging
import os
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ztna.errors import UsageError

log = logging.getLogger("ztna.agent")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFA_F_NODAD = 0x02
IPV6_MIN_MTU = 1280


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


def _route(ipr: IPRoute, action: str, dst: str, index: int | None = None, src: str | None = None) -> None:
    """`dst` is an address (a host route) or a prefix (the synthetic pools of names)."""
    ip = ipaddress.ip_network(dst, strict=True)
    kwargs: dict[str, Any] = {"dst": str(ip)}
    if ip.version == 6:
        kwargs["family"] = socket.AF_INET6
    if index is not None:
        kwargs["oif"] = index
    if src is not None:
        kwargs["prefsrc"] = src
    ipr.route(action, **kwargs)


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
        name = state.get("tun")
        cleaned = False
        with IPRoute() as ipr:
            for dst in state.get("routes", []):
                try:
                    _route(ipr, "del", dst)
                    cleaned = True
                except NetlinkError:
                    pass
            if name:
                idx = ipr.link_lookup(ifname=name)
                if idx and _is_tun(ipr, idx[0]):
                    try:
                        ipr.link("del", index=idx[0])
                        cleaned = True
                    except NetlinkError as exc:
                        log.warning("could not delete stale device %s: %s", name, exc)
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
        with IPRoute() as ipr:
            self._configure(ipr, v4=v4, v6=v6, mtu=mtu)

    def _configure(self, ipr: IPRoute, *, v4: str, v6: str, mtu: int) -> None:
        self.index = ipr.link_lookup(ifname=self.name)[0]
        has_v6 = any(":" in r for r in self.routes)
        ipr.link("set", index=self.index, mtu=mtu, state="up")
        self.mtu = mtu
        ipr.addr("add", index=self.index, address=v4, prefixlen=32)
        self.addresses.append(v4)
        if has_v6:
            try:
                ipr.addr("add", index=self.index, address=v6, prefixlen=128, flags=IFA_F_NODAD)
                self.addresses.append(v6)
            except NetlinkError as exc:
                log.warning("no IPv6 on %s (%s); IPv6 virtual IPs unreachable", self.name, exc)
        for dst in self.routes:
            src = v6 if ":" in dst else v4
            if ":" in dst and v6 not in self.addresses:
                continue
            try:
                _route(ipr, "add", dst, self.index, src)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    # Someone else routes this IP: replace, the user asked for the tunnel.
                    _route(ipr, "replace", dst, self.index, src)
                else:
                    raise
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
            with IPRoute() as ipr:
                ipr.link("set", index=self.index, mtu=mtu)
        except NetlinkError as exc:
            log.warning("%s: cannot set mtu %d: %s", self.name, mtu, exc)
            return
        log.info("%s: mtu %d -> %d (live DATAGRAM maximum)", self.name, self.mtu, mtu)
        self.mtu = mtu

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        ipr = IPRoute()
        try:
            for dst in self.routes:
                try:
                    _route(ipr, "del", dst, self.index or None)
                except NetlinkError:
                    pass
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            idx = ipr.link_lookup(ifname=self.name)
            if idx and idx[0] == self.index and _is_tun(ipr, idx[0]):
                try:
                    ipr.link("del", index=idx[0])
                except NetlinkError:
                    pass   # already gone with the fd (not persistent)
        finally:
            ipr.close()
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


def _is_tun(ipr: IPRoute, index: int) -> bool:
    try:
        link = ipr.get_links(index)[0]
    except (NetlinkError, IndexError):
        return False
    info = link.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_KIND") == "tun"
