"""`Agent`: the Python API behind `ztna agent` (and what `ztna demo` drives).

    agent = Agent(options)          # ztna.agent.config.AgentOptions
    await agent.start()             # TUN or userspace data plane, session, control socket
    agent.snapshot()                # the dict `ztna status --json` prints
    await agent.wait_ready()        # every service ACKed (tests, demo)
    await agent.stop()              # routes/device removed, GoAway sent

Start order matters for crash safety: the TUN state file is written before the device
exists; the session starts after the data plane so no reply finds nowhere to go.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from typing import TYPE_CHECKING, Any

from ztna import limits
from ztna.agent.config import AgentOptions
from ztna.agent.control import ControlServer
from ztna.agent.session import ACKED, REFUSED, Session
from ztna.wire import to_connector_overhead

if TYPE_CHECKING:  # imported where they start: the TUN parts need root and pyroute2
    from ztna.agent.dns import DnsResponder
    from ztna.agent.tcp_redirect import TcpRedirect
    from ztna.agent.tun import TunDevice
    from ztna.agent.tun_mode import TunDataPlane
    from ztna.agent.userspace import Userspace
    from ztna.observe import MetricsServer

log = logging.getLogger("ztna.agent")


class Agent:
    def __init__(self, options: AgentOptions, *, rng: random.Random | None = None) -> None:
        self.options = options
        # The one packet demux: every tunnel packet the session receives (relay or direct)
        # goes through _dispatch to the data plane that owns its destination.
        self.session = Session(options, on_packet=self._dispatch, rng=rng)
        self.tun: TunDevice | None = None
        self.dataplane: TunDataPlane | None = None
        self.userspace: Userspace | None = None
        self.redirect: TcpRedirect | None = None   # TUN mode, --tcp-transport stream
        self.dns: DnsResponder | None = None   # TUN mode, DNS-pattern services
        self.metrics_server: MetricsServer | None = None  # --metrics: direct-path warm-up histograms
        self.control = ControlServer(options.state_dir / f"{options.name}.sock", self.snapshot)
        self.started_at: float | None = None
        self._stopped = asyncio.Event()
        self._dropped_no_plane = 0

    async def _start_metrics(self, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry

        from ztna.metrics import MetricRow, MetricTable
        from ztna.observe import serve_metrics

        direct = self.session.direct
        registry = direct.registry if direct is not None else CollectorRegistry()

        def health() -> tuple[bool, dict[str, Any]]:
            conn = self.session.conn
            ok = conn is not None and conn.handshake_complete and not conn.closed
            return ok, {"services": {s.spec.id: s.path for s in self.session.services}}

        session = self.session

        def session_stats() -> list[MetricRow]:
            c, t = session.counters, MetricTable()
            t.counter("ztna_agent_reconnects_total", "Reconnects to the Intermediate", c.reconnects)
            t.counter("ztna_agent_failovers_total", "Moves to the next of several Intermediates", c.failovers)
            t.counter("ztna_agent_zero_rtt_attempts_total", "Connections started with a session ticket",
                      c.zero_rtt_attempts)
            t.counter("ztna_agent_zero_rtt_accepted_total", "Connections whose 0-RTT data was accepted",
                      c.zero_rtt_accepted)
            t.counter("ztna_agent_queue_dropped_total", "Packets dropped while waiting for a connection",
                      c.queue_dropped)
            for svc in session.services:
                labels = {"service": svc.spec.id}
                t.counter("ztna_agent_tx_bytes_total", "Tunnel bytes sent", svc.tx_bytes, labels)
                t.counter("ztna_agent_rx_bytes_total", "Tunnel bytes received", svc.rx_bytes, labels)
            return t.rows

        self.metrics_server = await serve_metrics(session_stats, health, host, port, logger=log,
                                                  registry=registry)

    async def start(self) -> None:
        opts = self.options
        opts.state_dir.mkdir(parents=True, exist_ok=True)
        self.started_at = time.time()
        await self.control.start()
        try:
            if opts.mode == "tun":
                await self._start_tun()
            stream_tun = opts.mode == "tun" and opts.tcp_transport == "stream"
            if opts.mode == "userspace" or opts.forwards or opts.udp_forwards or opts.socks or stream_tun:
                # Forwards and SOCKS work in TUN mode too (same session, own source address).
                from ztna.agent.userspace import Userspace

                self.userspace = Userspace(self.session, opts)
                await self.userspace.start()
                if self.dataplane is not None:
                    self.dataplane.claim_destinations([self.userspace.src_v4, self.userspace.src_v6])
            if stream_tun:
                from ztna.agent.tcp_redirect import TcpRedirect

                assert self.userspace is not None and self.tun is not None  # both set above
                self.redirect = TcpRedirect(self.userspace, opts, self.tun)
                await self.redirect.start()
            if opts.mode == "tun" and opts.named:
                await self._start_dns()
            await self.session.start()
            if opts.metrics is not None:
                await self._start_metrics(*opts.metrics)
        except BaseException:
            await self.stop()
            raise
        log.info("agent %s started in %s mode for %s", opts.name, opts.mode,
                 ", ".join(s.id for s in opts.services))

    async def _start_dns(self) -> None:
        from ztna.agent.dns import DnsResponder, name_table

        if self.redirect is None or not self.redirect.installed:
            # Synthetic answers would lead applications into a black hole: better no answer.
            log.warning("dns: no DNS for the services' names: they need the TCP redirect "
                        "(--tcp-transport stream with nftables); SOCKS5 and -L still reach them by name")
            return
        table = name_table(self.options)
        self.redirect.names = table
        self.dns = DnsResponder(table, self.options, self.tun)
        await self.dns.start()

    async def _start_tun(self) -> None:
        from ztna.agent.tun import TunDevice
        from ztna.agent.tun_mode import TunDataPlane

        opts = self.options
        # Packets must fit the Intermediate's 0x30 leg to the Connector (the larger header).
        overhead = max(to_connector_overhead(s.id) for s in opts.services)
        guess = limits.max_datagram_payload(opts.udp_payload, limits.CONNECTION_ID_LENGTH) - overhead
        self.tun = TunDevice(opts.tun_name, opts.state_dir / f"{opts.name}.json")
        ips = [str(ip) for s in opts.services for ip in s.virtual_ips]
        if opts.named:
            ips += [str(net) for net in opts.dns_pools]     # synthetic addresses of names
        # Netlink (pyroute2) is blocking and runs its own loop: keep it off ours.
        await asyncio.to_thread(self.tun.open, v4=str(opts.tun_v4), v6=str(opts.tun_v6), virtual_ips=ips,
                                mtu=max(guess, 1280) if any(":" in i for i in ips) else guess)
        self.dataplane = TunDataPlane(self.session, self.tun.fd, local_v4=str(opts.tun_v4),
                                      local_v6=str(opts.tun_v6))
        self.dataplane.set_max_payload(guess + overhead)
        self.dataplane.start()
        self.session.on_mtu.append(self._mtu_changed)

    def _dispatch(self, packet: bytes) -> None:
        """A down-link packet goes to the userspace stack when it is addressed to its
        synthetic source (or there is no TUN), else to the TUN; with neither it is dropped."""
        userspace, dataplane = self.userspace, self.dataplane
        if userspace is not None and (dataplane is None or userspace.claims(packet)):
            userspace.on_packet(packet)
        elif dataplane is not None:
            dataplane.write_packet(packet)
        else:
            self._dropped_no_plane += 1

    def _mtu_changed(self, max_payload: int) -> None:
        tun = self.tun
        if self.dataplane is not None and tun is not None:
            mtu = self.dataplane.set_max_payload(max_payload)
            if mtu != tun.mtu:
                asyncio.ensure_future(asyncio.to_thread(tun.set_mtu, mtu))

    async def stop(self) -> None:
        if self._stopped.is_set():
            return
        # First of all, applications learn their connections are over (RST), while the
        # rules that route them to us still exist.
        if self.userspace is not None:
            self.userspace.reset_all()
        if self.dataplane is not None:
            await self.dataplane.reset_tcp_flows()
            self.dataplane.stop()
        if self.dns is not None:
            await self.dns.stop()
        if self.redirect is not None:
            await self.redirect.stop()
        if self.userspace is not None:
            await self.userspace.stop()
        await self.session.stop()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.tun is not None:
            await asyncio.to_thread(self.tun.close)
        await self.control.stop()
        self._stopped.set()
        log.info("agent %s stopped", self.options.name)

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Until every service is ACKed (raises TimeoutError, or RuntimeError if refused)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            states = [s.registration for s in self.session.services]
            if REFUSED in states:
                raise RuntimeError(f"registration refused: {self.snapshot()['services']}")
            if all(s == ACKED for s in states):
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"services not registered: {states}")
            await asyncio.sleep(0.02)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.stop()))
        await self.start()
        await self._stopped.wait()

    def snapshot(self) -> dict[str, Any]:
        if self.dataplane is not None:
            self.dataplane.sync_counters()   # what the native pump moved since the last look
        snap = self.session.snapshot()
        opts = self.options
        snap["agent"] = {
            "name": opts.name,
            "pid": os.getpid(),
            "mode": opts.mode,
            "started_at": self.started_at,
            "tcp_transport": opts.tcp_transport,
        }
        if self.tun is not None and self.dataplane is not None:
            snap["tun"] = {"name": self.tun.name, "mtu": self.tun.mtu, "addresses": self.tun.addresses,
                           "routes": self.tun.routes, **self.dataplane.snapshot()}
        if self.userspace is not None:
            snap["userspace"] = self.userspace.snapshot()
        if self.redirect is not None:
            snap["tcp_redirect"] = self.redirect.snapshot()
        if self.dns is not None:
            snap["dns"] = self.dns.snapshot()
        return snap
