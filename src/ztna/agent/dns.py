"""The Agent's DNS responder for DNS-pattern services (TUN mode): the thin driver.

Theory of operation
-------------------
* The responder's address (`--dns-listen`, default 100.64.0.53) is put on the TUN device
  as a /32, so it is on the tunnel's link and no other host's; we answer on UDP port 53
  there. The answers themselves come from `ztna.names.answer.NameTable` (pure, dnspython):
  synthetic A/AAAA from the pools for covered names, REFUSED for any other name.
* The pools (100.80.0.0/16, fd00:80::/64 by default) are routed into the TUN, and the TCP
  redirect (`ztna.agent.tcp_redirect`) takes connections to them: the synthetic address
  names (service, name) for as long as it is bound, and the stream carries the name.
* Resolver routing: where systemd-resolved runs, `resolvectl` sets the TUN link's DNS
  server to the responder and its routing domains to the services' domains (`~corp.test`
  for `*.corp.test`, `~git.corp.test` for an exact name), not a default route: only those
  names ever reach us and the link's settings go with the device. Elsewhere (or with
  `--no-dns-configure`) we log the manual step: a first `nameserver 100.64.0.53` line in
  /etc/resolv.conf; the other names are REFUSED by us and glibc asks the next nameserver.
* One datagram in, at most one out; input that is not a DNS query is counted and dropped.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

from ztna.agent.config import AgentOptions
from ztna.names.answer import NameTable
from ztna.names.pool import SyntheticPool
from ztna.observe import format_address
from ztna.startup import bind_error

log = logging.getLogger("ztna.agent")

DNS_PORT = 53
POOL_GRACE = 2.0


def name_table(options: AgentOptions) -> NameTable:
    pools = [SyntheticPool(net, ttl=options.dns_ttl, grace=POOL_GRACE) for net in options.dns_pools]
    return NameTable({s.id: s.patterns for s in options.services}, pools)


def routing_domains(options: AgentOptions) -> list[str]:
    """`~corp.test` per pattern suffix, deduplicated, in the order given."""
    out: list[str] = []
    for svc in options.services:
        for pat in svc.patterns:
            dom = f"~{pat.domain}"
            if dom not in out:
                out.append(dom)
    return out


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, owner: DnsResponder) -> None:
        self.owner = owner
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = self.owner.table.answer(data, now=asyncio.get_running_loop().time())
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class DnsResponder:
    def __init__(self, table: NameTable, options: AgentOptions, tun: Any) -> None:
        self.table = table
        self.options = options
        self.tun = tun
        self.transport: asyncio.DatagramTransport | None = None
        self.resolver: str = "not configured"

    @property
    def address(self) -> str:
        return str(self.options.dns_listen)

    async def start(self) -> None:
        await asyncio.to_thread(self._add_address)
        try:
            self.transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: _Protocol(self), local_addr=(self.address, DNS_PORT))
        except OSError as exc:
            raise bind_error("DNS responder", "udp", self.address, DNS_PORT, exc) from None
        domains = routing_domains(self.options)
        log.info("dns: answering %s on %s (TTL %gs, pools %s)", " ".join(d[1:] for d in domains),
                 format_address((self.address, DNS_PORT)), self.options.dns_ttl,
                 " ".join(str(n) for n in self.options.dns_pools))
        if self.options.dns_configure:
            await self._configure_resolved(domains)
        if self.resolver != "systemd-resolved":
            log.info("dns: to resolve these names, put 'nameserver %s' first in /etc/resolv.conf "
                     "(other names are refused here, so the next nameserver answers them)", self.address)

    def _add_address(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.addr("add", index=self.tun.index, address=self.address, prefixlen=32)
            except NetlinkError as exc:
                if exc.code != 17:      # EEXIST: already there (a restart on the same device)
                    raise
        if self.address not in self.tun.addresses:
            self.tun.addresses.append(self.address)

    async def _run(self, *argv: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), 5.0)
        except TimeoutError:
            proc.kill()
            _, err = await proc.communicate()
        return proc.returncode or 0, (err or b"").decode(errors="replace").strip()

    async def _configure_resolved(self, domains: list[str]) -> None:
        if shutil.which("resolvectl") is None:
            return
        dev = self.tun.name
        for argv in (("resolvectl", "dns", dev, self.address), ("resolvectl", "domain", dev, *domains),
                     ("resolvectl", "default-route", dev, "false")):
            rc, err = await self._run(*argv)
            if rc != 0:
                log.info("dns: systemd-resolved not configured (%s: %s)", " ".join(argv[:2]), err or f"exit {rc}")
                return
        self.resolver = "systemd-resolved"
        log.info("dns: systemd-resolved sends %s on link %s to %s", " ".join(domains), dev, self.address)

    async def stop(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self.resolver == "systemd-resolved":
            await self._run("resolvectl", "revert", self.tun.name)
            self.resolver = "not configured"

    def snapshot(self) -> dict[str, Any]:
        return {"listen": format_address((self.address, DNS_PORT)), "resolver": self.resolver, **self.table.snapshot()}
