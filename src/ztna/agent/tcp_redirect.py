"""TUN mode with `--tcp-transport stream`: the kernel terminates TCP, QUIC streams carry it.

Theory of operation
-------------------
* An nftables table `inet ztna_<agent name>` in the Agent's network namespace redirects
  every locally originated TCP connection to a service virtual IP (nat hook `output`,
  priority -100: nft 1.0.6 refuses `dstnat` there) to our listener on 127.0.0.1 (IPv4) or
  ::1 (IPv6). The application's TCP therefore ends in our own kernel, as with sshuttle; the
  redirect happens before routing, so none of it reaches the TUN. UDP and ICMP are not
  matched and keep flowing through the TUN as DATAGRAMs.
* Accept → `SO_ORIGINAL_DST` (IPv4) / `IP6T_SO_ORIGINAL_DST` (IPv6) gives the virtual IP
  and port the application dialled → the service → one QUIC stream with a `StreamOpen`
  header, exactly like a userspace `-L` forward: we reuse `Userspace._open` / `_splice`
  (status byte, back-pressure both ways, FIN/RST mapping), which put the stream on the
  service's direct P2P connection when one is live, else on the Intermediate connection.
  A refused stream (status byte not OK, or no connection within 10 s) aborts the accepted
  socket with RST, which is what the application would have seen from the backend.
* The redirect only needs two separate listeners (one per family, separate sockets, so
  SO_ORIGINAL_DST is asked with the matching level). The Agent opens no TCP of its own to
  virtual IPs, so no `meta mark` bypass rule is needed.
* DNS-pattern services: the synthetic pools (`ztna.names.pool`, answered by the Agent's DNS
  responder) are redirected too; an accepted connection to a synthetic address is looked up
  in the name table and opens a `NamedStreamOpen` (service, name, port). An address no
  longer bound (its TTL ran out) is reset like any unknown destination.
* Without nftables (no `nft` binary, or it refuses the rules: no CAP_NET_ADMIN, no nat
  support in the kernel) we log a warning and leave TCP to the TUN, i.e. the datagram
  carriage: `stream` is the default, and a default must not stop the Agent from starting.
* Crash safety: the table is an nftables *owner* table (`OwnedTable`): it dies with the
  `nft -i` child that created it, and that child dies with the Agent, so after a SIGKILL no
  redirect to a dead listener is left behind. The table name is also recorded in the TUN
  state file (`TunDevice.record_nft_table`) and `TunDevice.recover_stale` deletes a leftover
  of an older version; creating the table first adds-and-deletes any same-named leftover.
* Exit: `Userspace.reset_all` aborts every proxied connection with RST (SO_LINGER 0) before
  the rules and listeners go, so applications see "connection reset" at once instead of
  waiting on a peer that is gone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import shutil
import socket
import struct
from typing import Any

from ztna.agent.config import AgentOptions
from ztna.agent.tun import TunDevice, delete_nft_table
from ztna.agent.userspace import _NO_STATUS, StreamFailed, Userspace, reset_writer
from ztna.errors import UsageError, error_text
from ztna.observe import format_address

log = logging.getLogger("ztna.agent")

SO_ORIGINAL_DST = 80          # SOL_IP, linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80     # SOL_IPV6 (Python has no socket.SOL_IPV6: IPPROTO_IPV6 is it)


def table_name(agent_name: str) -> str:
    """`ztna_<name>` with anything but [A-Za-z0-9_] replaced (nft identifiers)."""
    return "ztna_" + re.sub(r"[^A-Za-z0-9_]", "_", agent_name)


def ruleset(table: str, v4: list[str], v6: list[str], port4: int, port6: int) -> str:
    """The commands for `nft -i`, one per line (interactive nft takes no multi-line blocks).
    A same-named leftover is removed first; the table is created with the `owner` flag, so
    the kernel deletes it when the nft process holding its netlink socket ends."""
    lines = [
        f"add table inet {table}",
        f"delete table inet {table}",
        f"add table inet {table} {{ flags owner; }}",
        f"add chain inet {table} output {{ type nat hook output priority -100; policy accept; }}",
    ]
    if v4:
        lines.append(f"add rule inet {table} output ip daddr {{ {', '.join(v4)} }} meta l4proto tcp redirect to :{port4}")
    if v6:
        lines.append(f"add rule inet {table} output ip6 daddr {{ {', '.join(v6)} }} meta l4proto tcp redirect to :{port6}")
    return "\n".join(lines) + "\n"


def original_dst(sock: socket.socket) -> tuple[str, int]:
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack_from("!H4s", raw, 2)
        return socket.inet_ntop(socket.AF_INET, addr), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
    port, _flow, addr, _scope = struct.unpack_from("!HI16sI", raw, 2)
    return socket.inet_ntop(socket.AF_INET6, addr), port


def _die_with_parent() -> None:
    """In the nft child, before exec: SIGTERM it when the Agent dies, however it dies."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 15)   # PR_SET_PDEATHSIG, SIGTERM
    except (OSError, AttributeError):
        pass   # EOF on its stdin (the Agent's end of the pipe closes with it) ends it too


class OwnedTable:
    """An nftables table that lives exactly as long as this process.

    The table carries NFT_TABLE_F_OWNER (`flags owner`, kernel >= 5.12): the kernel deletes
    it when the netlink socket that created it closes, and nobody else may change it. That
    socket belongs to an `nft -i` child that reads its commands from a pipe we hold: when
    the Agent exits — cleanly, by an exception, or by SIGKILL — the pipe closes (and the
    child gets SIGTERM from PR_SET_PDEATHSIG), nft exits, and the redirect is gone, so TCP
    to the virtual IPs is never sent to a listener that no longer exists."""

    def __init__(self, table: str) -> None:
        self.table = table
        self.proc: asyncio.subprocess.Process | None = None

    async def create(self, script: str) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "nft", "-i", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, preexec_fn=_die_with_parent)
        assert self.proc.stdin is not None
        self.proc.stdin.write(script.encode())
        await self.proc.stdin.drain()
        # nft -i reports errors on stderr and goes on; whether the rules are in place is
        # read back from the kernel (reading an owned table is allowed to anyone).
        deadline = asyncio.get_running_loop().time() + 5.0
        while asyncio.get_running_loop().time() < deadline and self.proc.returncode is None:
            if "redirect" in await self._list():
                return
            await asyncio.sleep(0.05)
        err = await self.close()
        raise UsageError(f"nft refused the TCP redirect rules: {err or 'no rules after 5 s'}")

    async def _list(self) -> str:
        proc = await asyncio.create_subprocess_exec(
            "nft", "list", "table", "inet", self.table, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
        return out.decode(errors="replace")

    async def close(self) -> str:
        """End the owner (the kernel drops the table with its socket); returns nft's stderr."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 3.0)
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
        return (err or b"").decode(errors="replace").strip()


class TcpRedirect:
    def __init__(self, userspace: Userspace, options: AgentOptions, tun: TunDevice) -> None:
        self.userspace = userspace
        self.options = options
        self.tun = tun
        self.table = table_name(options.name)
        self.v4 = [str(ip) for s in options.services for ip in s.virtual_ips if ip.version == 4]
        self.v6 = [str(ip) for s in options.services for ip in s.virtual_ips if ip.version == 6]
        self.names: Any = None      # ztna.names.answer.NameTable, set by the Agent (DNS services)
        if options.named:
            self.v4 += [str(n) for n in options.dns_pools if n.version == 4]
            self.v6 += [str(n) for n in options.dns_pools if n.version == 6]
        self.servers: list[asyncio.AbstractServer] = []
        self.ports: dict[int, int] = {}
        self.installed = False
        self.owner = OwnedTable(self.table)
        self.fallback: str | None = None   # why TCP rides DATAGRAMs instead (no nftables)
        self.stats = {"accepted": 0, "refused": 0, "not_redirected": 0, "name_expired": 0}

    async def start(self) -> None:
        for family, host, ips in ((4, "127.0.0.1", self.v4), (6, "::1", self.v6)):
            if not ips:
                continue
            try:
                srv = await asyncio.start_server(self._accept, host, 0, reuse_address=True)
            except OSError as exc:
                # e.g. IPv6 disabled in this namespace: those addresses keep going through
                # the TUN as DATAGRAMs.
                log.warning("no IPv%d listener on %s (%s): IPv%d TCP rides DATAGRAMs", family, host,
                            exc.strerror or exc, family)
                if family == 6:
                    self.v6 = []
                else:
                    self.v4 = []
                continue
            self.servers.append(srv)
            self.ports[family] = int(srv.sockets[0].getsockname()[1])
        await asyncio.to_thread(self.tun.record_nft_table, self.table)
        try:
            if shutil.which("nft") is None:
                raise UsageError("no nft binary (install nftables)")
            await self.owner.create(ruleset(self.table, self.v4, self.v6,
                                            self.ports.get(4, 0), self.ports.get(6, 0)))
        except UsageError as exc:
            self.fallback = str(exc)
            log.warning("tcp over QUIC streams unavailable (%s); TCP goes through the TUN in DATAGRAMs",
                        exc)
            await self.stop()
            return
        self.installed = True
        log.info("tcp over QUIC streams: nft table inet %s redirects %s to %s", self.table,
                 " ".join(self.v4 + self.v6),
                 " ".join(f"{h}:{p}" for h, p in
                          zip(("127.0.0.1", "[::1]"), (self.ports.get(4), self.ports.get(6)),
                              strict=True) if p))

    async def stop(self) -> None:
        if self.installed:
            # Rules first: new connections must not hit a closed listener. Ending the owner
            # removes the table; a stuck nft is killed, and the delete is only a fallback.
            await self.owner.close()
            await asyncio.to_thread(delete_nft_table, self.table)
            self.installed = False
            log.info("nft table inet %s removed", self.table)
        for srv in self.servers:
            srv.close()
        self.servers = []

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            ip, port = original_dst(sock)
            local = sock.getsockname()
        except OSError as exc:
            log.debug("no original destination: %s", exc)
            self.stats["not_redirected"] += 1
            writer.transport.abort()
            return
        if (ip, port) == tuple(local[:2]):   # dialled us directly, not through the redirect
            self.stats["not_redirected"] += 1
            writer.transport.abort()
            return
        name: str | None = None
        target = str(ipaddress.ip_address(ip))
        try:
            spec, vip = self.options.service_for_target(target)
        except UsageError:
            synthetic = self.names is not None and self.names.is_synthetic(target)
            bound = self.names.lookup(target, now=asyncio.get_running_loop().time()) if synthetic else None
            if bound is None:
                self.stats["name_expired" if synthetic else "not_redirected"] += 1
                if synthetic:
                    log.info("tcp %s: synthetic address bound to no name (its TTL ran out), reset",
                             format_address((target, port)))
                writer.transport.abort()
                return
            spec = next(s for s in self.options.services if s.id == bound.service)
            vip, name = ipaddress.ip_address(target), bound.name
        us = self.userspace
        us.app_writers.add(writer)     # reset on exit even while the stream is being opened
        try:
            conn, sid, sink, early = await us._open(spec, vip if name is None else None, port, name)
        except (TimeoutError, StreamFailed) as exc:
            self.stats["refused"] += 1
            us.stats["tcp_failed"] += 1
            where = format_address((str(vip), port)) if name is None else f"{name}:{port} ({vip})"
            log.info("tcp %s via stream refused: %s", where, error_text(exc, _NO_STATUS))
            us.app_writers.discard(writer)
            reset_writer(writer)
            return
        self.stats["accepted"] += 1
        us.stats["tcp_opened"] += 1
        await us._splice(reader, writer, conn, sid, sink, early)

    def snapshot(self) -> dict[str, Any]:
        return {"nft_table": f"inet {self.table}" if self.installed else None, "fallback": self.fallback,
                "listen_ports": {f"ipv{k}": v for k, v in self.ports.items()}, **self.stats}
