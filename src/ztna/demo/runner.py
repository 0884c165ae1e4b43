"""The demo's script: set up, prove the tunnel with real bytes, measure, tear down.

``run_demo(options, emit)`` walks the steps below and returns the result dict (the
``--json`` output). ``emit(ok, text)`` is told about every step as it finishes
(ok = True/False, or None for plain information); the CLI renders it with rich.

1. temp dir: throwaway PKI (``init_pki``) and a random file of ``size`` bytes (sha256 kept)
2. layout up (namespaces / lab), then backends, Intermediate, Connector, each awaited on a
   real signal: the backends' ready file, the Intermediate's startup line and /healthz,
   the Connector's /healthz showing the service registered
3. lab only: the Agent must NOT reach the backends directly (TCP connect from its netns)
4. Agent, awaited on its control socket (``ztna status --json``): connected, service ACKed
5. UDP echo (three sizes, compared byte for byte), then (if the Agent runs P2P) up to
   ``direct_wait`` s for the path to go direct, HTTP download (sha256), ICMP echo (TUN only, our own ICMP socket)
6. reconnect: the Intermediate is restarted (the Agent resumes with its ticket: "zero_rtt"),
   then the Agent process (a new process has no ticket: "full"); time from spawn to the
   first echoed UDP byte, plus the Agent's own connect time and handshake kind from its status
5b. one app by DNS name: ``files.apps.demo`` (the service also covers ``*.apps.demo``;
   the backends' DNS resolves it at the Connector): in TUN mode asked of the Agent's DNS
   responder and fetched from the synthetic address it answers, in userspace mode fetched
   through the Agent's SOCKS5 with the name (sha256 of a small file)
Teardown always runs (``finally``): children SIGTERM then SIGKILL, namespaces or lab
deleted, temp dir removed (unless ``keep``).

``ok`` is true only when every check that ran was byte-exact and nothing failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ztna.demo.probe as probe
from ztna.demo.layouts import (
    LabLayout,
    Layout,
    LocalLayout,
    NetnsLayout,
    can_tun,
    default_prefix,
    host_port,
    require,
)
from ztna.demo.procs import DemoError, Supervisor, ztna_argv
from ztna.errors import UsageError

Emit = Callable[[bool | None, str], None]
SERVICE = "web"
VIPS = ("10.100.0.2", "fd00:100::2")
HTTP_VPORT, UDP_VPORT = 80, 7
FILE_NAME = "demo.bin"
NAME_PATTERN = "*.apps.demo"     # the service is reached by these names too
APP_NAME = "files.apps.demo"
NAME_FILE, NAME_FILE_SIZE = "byname.bin", 256 * 1024
AGENT_DNS = "100.64.0.53"        # the Agent's DNS responder (TUN mode default)
TUN_SOCKS_PORT = 1080            # in the Agent's own (fresh) namespace: free
ECHO_SIZES = (16, 600, 1200)
MODE_ENV = "ZTNA_DEMO_MODE"  # "userspace" forces userspace mode (e.g. tests, containers)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    size: int = 20_000_000
    mode: str | None = None          # "userspace" | "tun" | None (auto)
    lab: bool = False
    nat_a: str = "none"
    nat_b: str = "none"
    ip: str = "4"
    delay_ms: float = 0.0
    loss_pct: float = 0.0
    transport: str = "stream"
    reconnect: bool = True
    direct_wait: float = 10.0
    startup_timeout: float = 20.0
    keep: bool = False

    def resolved_mode(self) -> str:
        if self.lab:
            if self.mode == "userspace":
                raise UsageError("--lab runs the Agent in TUN mode; drop --mode userspace")
            require(can_tun(), "--lab")
            return "tun"
        mode = self.mode or os.environ.get(MODE_ENV) or None
        if mode not in (None, "tun", "userspace"):
            raise UsageError(f"{MODE_ENV} must be 'tun' or 'userspace', got {mode!r}")
        if mode == "tun":
            require(can_tun(), "--mode tun")
        return mode or ("tun" if can_tun() is None else "userspace")


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find_key(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for v in obj.values():
            found = _find_key(v, key)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_key(v, key)
            if found is not None:
                return found
    return None


class Demo:
    def __init__(self, options: DemoOptions, emit: Emit) -> None:
        self.o = options
        self.emit = emit
        self.mode = options.resolved_mode()
        prefix = default_prefix()
        self.layout: Layout
        if options.lab:
            self.layout = LabLayout(prefix, nat_a=options.nat_a, nat_b=options.nat_b, ip=options.ip,
                                    delay_ms=options.delay_ms, loss_pct=options.loss_pct)
        elif self.mode == "tun":
            self.layout = NetnsLayout(prefix)
        else:
            self.layout = LocalLayout()
        self.tmp = Path(tempfile.mkdtemp(prefix="ztna-demo-"))
        self.sup = Supervisor(self.tmp / "logs")
        self.state_dir = self.tmp / "agent-state"
        self.transport = options.transport
        self.result: dict[str, Any] = {
            "ok": False, "mode": self.mode, "layout": self.layout.name,
            "transport": options.transport, "tcp_carriage": None, "path": None,
            "http_bytes": 0, "http_expected_bytes": options.size, "http_sha256_ok": False,
            "http_mbps": None, "http_seconds": None, "udp_echo_ok": False, "icmp_ok": None,
            "icmp_rtt_ms": None, "rtt_ms": None, "warmup_ms": None, "reconnect_ms": None,
            "p2p": None, "isolated": None, "namespaces": None, "lab": None, "pids": {},
            "by_name_ok": False, "by_name_address": None,
            "workdir": str(self.tmp), "errors": [], "notes": [],
        }

    # ------------------------------------------------------------------ helpers
    def step(self, ok: bool | None, text: str) -> None:
        if ok is None:  # information (fallbacks, hints) also reaches --json readers
            self.result["notes"].append(text)
        self.emit(ok, text)

    def fail(self, text: str) -> None:
        self.result["errors"].append(text)
        self.emit(False, text)

    def _log_matches(self, name: str, pattern: str) -> list[re.Match[str]]:
        try:
            text = (self.sup.log_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return []
        return list(re.finditer(pattern, text))

    def _log_match(self, name: str, pattern: str, *, skip: int = 0) -> re.Match[str] | None:
        """The newest line matching `pattern` among those after the first `skip` (logs append
        across restarts of a component)."""
        try:
            matches = self._log_matches(name, pattern)[skip:]
            return matches[-1] if matches else None
        except OSError:
            return None

    def agent_status(self) -> dict[str, Any]:
        from ztna.agent.control import query

        return query(self.state_dir / "demo.sock", timeout=2.0)

    # ------------------------------------------------------------------ steps
    def prepare(self) -> None:
        from ztna.certs import init_pki

        init_pki(self.tmp / "pki", [SERVICE], days=1)
        www = self.tmp / "www"
        www.mkdir()
        digest = hashlib.sha256()
        with open(www / FILE_NAME, "wb") as f:
            left = self.o.size
            while left > 0:
                chunk = os.urandom(min(left, 1 << 20))
                digest.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        small = os.urandom(NAME_FILE_SIZE)
        (www / NAME_FILE).write_bytes(small)
        self.name_sha256 = hashlib.sha256(small).hexdigest()
        os.chmod(self.tmp, 0o755)  # a lab/netns child may run with another uid some day; harmless
        self.sha256 = digest.hexdigest()
        self.step(True, f"throwaway certificates and a {self.o.size:,}-byte random file "
                        f"in {self.tmp}")

    def start_layout(self) -> None:
        try:
            self.layout.up()
        except UsageError as exc:
            auto = self.o.mode is None and not os.environ.get(MODE_ENV) and not self.o.lab
            if not (auto and isinstance(self.layout, NetnsLayout)):
                raise
            # root without namespace rights (a container): still show the tunnel working
            self.layout.down()
            self.step(None, f"no network namespaces here ({exc}); falling back to userspace mode")
            self.mode, self.layout = "userspace", LocalLayout()
            self.result.update(mode=self.mode, layout=self.layout.name)
            return
        if isinstance(self.layout, LabLayout):
            self.result["lab"] = self.layout.describe()
            cfg = self.layout.lab.config
            self.step(True, f"lab {cfg.prefix} up: NAT A {cfg.nat_a}, NAT B {cfg.nat_b}, "
                            f"IPv{cfg.ip}, delay {cfg.delay_ms:g} ms, loss {cfg.loss_pct:g}%")
        elif isinstance(self.layout, NetnsLayout):
            self.result["namespaces"] = [self.layout.pub, self.layout.agent]
            self.step(True, f"namespaces {self.layout.pub} (Intermediate, Connector, apps) and "
                            f"{self.layout.agent} (Agent with TUN), joined by a veth")

    def start_backends(self) -> None:
        ready = self.tmp / "backends.json"
        argv = ["-m", "ztna.demo.backends", "--host", self.layout.backend_host,
                "--root", str(self.tmp / "www"), "--ready-file", str(ready)]
        self.sup.spawn("backends", [sys.executable, *argv], runner=self.layout.runner("backends"))
        ports = self.sup.wait_for(lambda: json.loads(ready.read_text()) if ready.exists() else None,
                                  timeout=self.o.startup_timeout, component="backends",
                                  what="the HTTP and UDP echo servers to bind")
        self.http_port, self.udp_port = int(ports["http"]), int(ports["udp"])
        self.dns_port = int(ports["dns"])
        self.step(True, f"private apps: HTTP {self.layout.backend_host}:{self.http_port}, "
                        f"UDP echo {self.layout.backend_host}:{self.udp_port}")

    def start_intermediate(self, port: int | None = None, *, quiet: bool = False) -> None:
        lp = self.layout.intermediate_port if port is None else port
        pattern = r"listening on udp \S*?:(\d+)[;,].*?metrics http://[^ ]*?:(\d+)/"
        earlier = len(self._log_matches("intermediate", pattern))
        # A state dir: its strike register (single-use session tickets) and address-token key
        # survive a restart, so Agents resume in 0-RTT with the new process.
        self.sup.spawn("intermediate", ztna_argv(
            "intermediate", "--listen", host_port(self.layout.listen_host, lp),
            "--pki", str(self.tmp / "pki"), "--metrics", "127.0.0.1:0",
            "--state-dir", str(self.tmp / "intermediate-state")),
            runner=self.layout.runner("intermediate"))
        # the startup line is printed once the socket is bound; it names the real ports
        m = self.sup.wait_for(lambda: self._log_match("intermediate", pattern, skip=earlier),
                              timeout=self.o.startup_timeout, component="intermediate",
                              what="its 'listening' line")
        self.int_port, metrics = int(m.group(1)), int(m.group(2))
        self.sup.wait_for(lambda: self._healthy("intermediate", metrics),
                          timeout=self.o.startup_timeout, component="intermediate", what="/healthz")
        if quiet:
            return
        self.step(True, f"Intermediate listening on udp {self.layout.listen_host} "
                        f"port {self.int_port} (pid {self.sup.children['intermediate'].popen.pid}),"
                        " /healthz ok")

    def _healthy(self, role: str, port: int) -> dict[str, Any] | None:
        status, body = self.layout.call(
            role, lambda: probe.http_json("127.0.0.1", port, "/healthz"))
        return body if status == 200 and body.get("ok") else None

    def start_connector(self) -> None:
        bh = self.layout.backend_host
        spec = (f"{SERVICE}={','.join(VIPS)},{NAME_PATTERN};tcp:{HTTP_VPORT}={host_port(bh, self.http_port)};"
                f"udp:{UDP_VPORT}={host_port(bh, self.udp_port)}")
        self.sup.spawn("connector", ztna_argv(
            "connector", "--intermediate", self.layout.intermediate_for("connector", self.int_port),
            "--server-name", "localhost", "--pki", str(self.tmp / "pki"), "--service", spec,
            "--dns-server", host_port(bh, self.dns_port),
            "--p2p-port", self.layout.p2p_port, "--metrics", "127.0.0.1:0"),
            runner=self.layout.runner("connector"))
        pattern = r"metrics on http://[^ ]*?:(\d+)/"
        m = self.sup.wait_for(lambda: self._log_match("connector", pattern),
                              timeout=self.o.startup_timeout, component="connector",
                              what="its metrics line")
        metrics = int(m.group(1))

        def registered() -> dict[str, Any] | None:
            body = self._healthy("connector", metrics)
            return body if body and body.get("services", {}).get(SERVICE) == "registered" else None

        self.sup.wait_for(registered, timeout=self.o.startup_timeout, component="connector",
                          what=f"service '{SERVICE}' registered with the Intermediate (/healthz)")
        pid = self.sup.children["connector"].popen.pid
        self.step(True, f"Connector up (pid {pid}): service '{SERVICE}' = {', '.join(VIPS)}, {NAME_PATTERN} -> "
                        f"HTTP :{HTTP_VPORT}, UDP echo :{UDP_VPORT}; registered")

    def check_isolation(self) -> None:
        if not isinstance(self.layout, LabLayout):
            return
        host = self.layout.backend_host
        reach = self.layout.call(
            "agent", lambda: probe.tcp_reachable(host, self.http_port, timeout=1.5))
        self.result["isolated"] = not reach
        if reach:
            self.fail(f"the Agent's namespace reaches the app {host}:{self.http_port} directly: "
                      "the lab does not isolate it, the demo would prove nothing")
        else:
            self.step(True, f"the Agent cannot reach the app {host}:{self.http_port} directly "
                            "(as it should)")

    def agent_argv(self) -> list[str]:
        argv = ["agent", "--intermediate", self.layout.intermediate_for("agent", self.int_port),
                "--server-name", "localhost", "--pki", str(self.tmp / "pki"),
                "--service", f"{SERVICE}={','.join(VIPS)},{NAME_PATTERN}", "--name", "demo",
                "--state-dir", str(self.state_dir), "--tcp-transport", self.transport]
        if self.mode == "tun":
            # The demo's resolver is asked directly: the host's systemd-resolved stays as it is.
            argv += ["--mode", "tun", "--tun-name", "ztna0", "--no-dns-configure",
                     "--socks", f"127.0.0.1:{TUN_SOCKS_PORT}"]
        else:
            argv += ["--mode", "userspace", "--socks", f"127.0.0.1:{self.local_socks}",
                     "-L", f"127.0.0.1:{self.local_tcp}={SERVICE}:{HTTP_VPORT}",
                     "-U", f"127.0.0.1:{self.local_udp}={SERVICE}:{UDP_VPORT}"]
        return ztna_argv(*argv)

    def spawn_agent(self) -> None:
        self.sup.spawn("agent", self.agent_argv(), runner=self.layout.runner("agent"))

    def wait_agent(self) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            snap = self.agent_status()
            if snap["intermediate"]["state"] != "connected":
                return None
            if any(s["registration"] != "acked" for s in snap["services"]):
                return None
            if self.mode == "userspace" and len(snap.get("userspace", {}).get("listeners", [])) < 3:
                return None
            return snap

        return self.sup.wait_for(ready, timeout=self.o.startup_timeout, component="agent",
                                 what="connected to the Intermediate with the service registered")

    def choose_carriage(self) -> None:
        """TCP over QUIC streams in TUN mode needs an nftables redirect; without `nft` the
        demo says so and uses the datagram carriage, which needs nothing but the TUN."""
        if self.mode == "tun" and self.transport == "stream" and shutil.which("nft") is None:
            self.transport = "datagram"
            self.step(None, "nft not found: TCP will ride the datagram carriage (IP packets in "
                            "QUIC DATAGRAMs); install nftables (apt-get install nftables) for "
                            "TCP over QUIC streams")

    def report_carriage(self, snap: dict[str, Any]) -> None:
        if self.mode != "tun":
            carriage = "stream"  # userspace forwards always open one QUIC stream per connection
        else:
            redirect = snap.get("tcp_redirect") or {}
            carriage = "stream" if redirect.get("nft_table") else "datagram"
            if self.transport == "stream" and carriage == "datagram":
                self.step(None, f"the Agent could not set up TCP over QUIC streams "
                                f"({redirect.get('fallback') or 'no nft table'}); install "
                                f"nftables (apt-get install nftables) to get them")
        self.result["tcp_carriage"] = carriage
        how = ("QUIC streams, one per connection" if carriage == "stream"
               else "IP packets in QUIC DATAGRAMs")
        self.step(None, f"TCP carriage: {carriage} ({how})")

    def start_agent(self) -> None:
        self.choose_carriage()
        if self.mode == "userspace":
            self.local_tcp = _free_port(socket.SOCK_STREAM)
            self.local_udp = _free_port(socket.SOCK_DGRAM)
            self.local_socks = _free_port(socket.SOCK_STREAM)
        self.spawn_agent()
        snap = self.wait_agent()
        i = snap["intermediate"]
        self.result["rtt_ms"] = i.get("rtt_ms")
        where = ("TUN ztna0 in its own namespace" if self.mode == "tun" else
                 f"forwards tcp 127.0.0.1:{self.local_tcp} -> {SERVICE}:{HTTP_VPORT}, "
                 f"udp 127.0.0.1:{self.local_udp} -> {SERVICE}:{UDP_VPORT}")
        self.step(True, f"Agent up (pid {snap['agent']['pid']}, {self.mode} mode, {where}): "
                        f"connected to {i['target']}, RTT {i.get('rtt_ms')} ms, service registered")
        self.report_carriage(snap)

    def targets(self) -> tuple[str, int, str, int]:
        if self.mode == "tun":
            return VIPS[0], HTTP_VPORT, VIPS[0], UDP_VPORT
        return "127.0.0.1", self.local_tcp, "127.0.0.1", self.local_udp

    def echo_once(self, payload: bytes, *, timeout: float, attempts: int) -> bool:
        _, _, uh, up = self.targets()
        got = self.layout.call("agent", lambda: probe.udp_echo(uh, up, payload, timeout=timeout,
                                                                 attempts=attempts))
        return got == payload

    def udp_test(self) -> None:
        bad = [n for n in ECHO_SIZES if not self.echo_once(os.urandom(n), timeout=2.0, attempts=5)]
        self.result["udp_echo_ok"] = not bad
        _, _, uh, up = self.targets()
        if bad:
            self.fail(f"UDP echo via {uh}:{up}: no byte-exact reply for payload sizes {bad}")
        else:
            self.step(True, f"UDP echo via {uh}:{up}: {len(ECHO_SIZES)} datagrams "
                            f"({', '.join(map(str, ECHO_SIZES))} bytes) came back byte-exact")

    def _p2p(self, snap: dict[str, Any]) -> dict[str, Any] | None:
        p2p = snap.get("p2p")
        if not isinstance(p2p, dict):
            return None
        svc = p2p.get("services", {}).get(SERVICE)
        return svc if isinstance(svc, dict) else None

    def _warm(self) -> dict[str, Any] | None:
        snap = self.agent_status()
        p = self._p2p(snap) or {}
        done = p.get("warmup_ms") is not None or snap["services"][0]["path"] != "direct"
        return snap if done else None

    def wait_direct(self) -> None:
        """Give the Agent's P2P machinery ``direct_wait`` s to reach a verdict."""
        snap = self.agent_status()
        if self._p2p(snap) is None:
            self.result["path"] = snap["services"][0]["path"]
            self.step(None, f"path: {self.result['path']} (this Agent reports no P2P state)")
            return
        deadline = time.monotonic() + self.o.direct_wait
        while time.monotonic() < deadline:
            snap = self.agent_status()
            p = self._p2p(snap) or {}
            if snap["services"][0]["path"] == "direct" or p.get("path_state") == "cooldown":
                break
            failed = p.get("punch_failures") or p.get("direct_failures")
            if p.get("path_state") == "relay" and failed:
                break
            time.sleep(0.05)
        direct = snap["services"][0]["path"] == "direct"
        if direct and (self._p2p(snap) or {}).get("warmup_ms") is None:
            # warm-up ends at the first byte received directly: give it one echo to carry
            self.echo_once(os.urandom(16), timeout=1.0, attempts=2)
            try:
                snap = self.sup.wait_for(lambda: self._warm(), timeout=3.0, component="agent",
                                         what="warmup_ms after the path went direct")
            except DemoError:  # a missing number is not a broken tunnel: reported as null
                snap = self.agent_status()
        p = self._p2p(snap) or {}
        self.result["path"] = snap["services"][0]["path"]
        self.result["p2p"] = {k: p.get(k) for k in ("path_state", "phases_ms", "direct_rtt_ms",
                                                     "punch_failures", "last_reason")}
        warm = p.get("warmup_ms", _find_key(snap, "warmup_ms"))
        self.result["warmup_ms"] = warm if self.result["path"] == "direct" else None
        if self.result["path"] == "direct":
            self.step(True, f"path: direct (P2P): {warm} ms from registration to direct, "
                            f"direct RTT {p.get('direct_rtt_ms')} ms")
        else:
            why = p.get("last_reason") or f"no verdict within {self.o.direct_wait:g} s"
            self.step(None, f"path: relay (P2P state {p.get('path_state')}: {why})")

    def http_test(self) -> None:
        hh, hp, _, _ = self.targets()
        try:
            d = self.layout.call(
                "agent", lambda: probe.http_get(hh, hp, "/" + FILE_NAME, timeout=30.0))
        except OSError as exc:
            self.fail(f"HTTP GET http://{hh}:{hp}/{FILE_NAME} failed before the response: "
                      f"{type(exc).__name__}: {exc}; last Agent log lines:\n"
                      f"{self.sup.tail('agent', 6)}")
            return
        ok = d.status == 200 and d.nbytes == self.o.size and d.sha256 == self.sha256
        self.result.update(http_bytes=d.nbytes, http_sha256_ok=d.sha256 == self.sha256,
                           http_mbps=round(d.mbps, 1), http_seconds=round(d.seconds, 3))
        text = (f"HTTP GET http://{hh}:{hp}/{FILE_NAME}: {d.nbytes:,} bytes in {d.seconds:.2f} s "
                f"= {d.mbps:.1f} Mbit/s, "
                f"sha256 {'matches' if d.sha256 == self.sha256 else 'DIFFERS'}")
        if d.error:
            text = (f"HTTP GET http://{hh}:{hp}/{FILE_NAME} broke off after {d.nbytes:,} of "
                    f"{self.o.size:,} bytes ({d.seconds:.1f} s): {d.error}; last Agent log "
                    f"lines:\n{self.sup.tail('agent', 6)}\nlast Connector log lines:\n"
                    f"{self.sup.tail('connector', 6)}")
        if ok:
            self.step(True, text)
        else:
            why = f" (status {d.status}, expected {self.o.size:,} bytes)"
            self.fail(text if d.error else text + why)

    def name_test(self) -> None:
        """One app by DNS name (module notes, step 5b)."""
        try:
            if self.mode == "tun" and self.result["tcp_carriage"] == "stream":
                addrs = self.layout.call("agent", lambda: probe.dns_query(AGENT_DNS, APP_NAME))
                if not addrs:
                    self.fail(f"the Agent's DNS ({AGENT_DNS}) gave no address for {APP_NAME}")
                    return
                host, how = addrs[0], f"Agent DNS {AGENT_DNS}: {APP_NAME} A {addrs[0]}"
                d = self.layout.call("agent", lambda: probe.http_get(host, HTTP_VPORT, "/" + NAME_FILE))
            else:
                # Names through the TUN need the nftables redirect; SOCKS5 needs nothing.
                socks = ("127.0.0.1", self.local_socks if self.mode == "userspace" else TUN_SOCKS_PORT)
                host, how = APP_NAME, f"SOCKS5 127.0.0.1:{socks[1]} with the name"
                d = self.layout.call("agent", lambda: probe.http_get(APP_NAME, HTTP_VPORT, "/" + NAME_FILE,
                                                                     socks=socks))
        except OSError as exc:
            self.fail(f"HTTP GET http://{APP_NAME}/{NAME_FILE} failed: {type(exc).__name__}: {exc}; "
                      f"last Agent log lines:\n{self.sup.tail('agent', 6)}")
            return
        ok = d.status == 200 and d.nbytes == NAME_FILE_SIZE and d.sha256 == self.name_sha256
        self.result.update(by_name_ok=ok, by_name_address=host)
        text = (f"by name: GET http://{APP_NAME}/{NAME_FILE} ({how}; resolved at the Connector): "
                f"{d.nbytes:,} bytes, sha256 {'matches' if d.sha256 == self.name_sha256 else 'DIFFERS'}")
        if ok:
            self.step(True, text)
        else:
            self.fail(f"{text} (status {d.status}{', ' + d.error if d.error else ''})")

    def icmp_test(self) -> None:
        if self.mode != "tun":
            return
        count = 3
        got, rtt, text = self.layout.call("agent", lambda: probe.icmp_echo(VIPS[0], count=count))
        ok = got == count
        self.result.update(icmp_ok=ok, icmp_rtt_ms=rtt)
        if ok:
            self.step(True, f"ICMP echo to {VIPS[0]} from the Agent's namespace: {text}, "
                            f"avg RTT {rtt} ms")
        else:
            self.fail(f"ICMP echo to {VIPS[0]} from the Agent's namespace failed: {text}")

    def _first_echo_after(self, t0: float, what: str, component: str) -> float:
        payload = os.urandom(32)
        self.sup.wait_for(lambda: self.echo_once(payload, timeout=0.1, attempts=1) or None,
                          timeout=self.o.startup_timeout, component=component,
                          what=what, interval=0.0)
        return round((time.monotonic() - t0) * 1000, 1)

    def measure_intermediate_restart(self) -> dict[str, Any]:
        """Restart the Intermediate (same port and state dir): the running Agent reconnects
        with the session ticket it holds in memory; spawn -> first echo."""
        self.sup.stop("intermediate")
        t0 = time.monotonic()
        self.start_intermediate(port=self.int_port, quiet=True)
        echo_ms = self._first_echo_after(t0, "the first echoed UDP byte after the Intermediate "
                                         "restarted", "agent")
        i = self.wait_agent()["intermediate"]
        return {"echo_ms": echo_ms, "connect_ms": i.get("connect_ms"), "handshake": i.get("handshake")}

    def measure_agent_restart(self) -> dict[str, Any]:
        """Restart the Agent process: it starts without tickets (they live in memory), so this
        is a full handshake; spawn -> first echo."""
        self.sup.stop("agent")
        t0 = time.monotonic()
        self.spawn_agent()
        echo_ms = self._first_echo_after(t0, "the first echoed UDP byte after a restart", "agent")
        i = self.wait_agent()["intermediate"]
        return {"echo_ms": echo_ms, "connect_ms": i.get("connect_ms"), "handshake": i.get("handshake")}

    def reconnect_test(self) -> None:
        if not self.o.reconnect:
            return
        kept = self.measure_intermediate_restart()
        fresh = self.measure_agent_restart()
        self.result["reconnect_ms"] = {
            "zero_rtt": kept["echo_ms"], "full": fresh["echo_ms"],
            "connect_ms": {"zero_rtt": kept["connect_ms"], "full": fresh["connect_ms"]},
            "handshake": {"zero_rtt": kept["handshake"], "full": fresh["handshake"]},
            "method": "zero_rtt: the Intermediate restarted (same port and state dir) and the "
                      "running Agent reconnected with the ticket it holds; full: the Agent "
                      "process restarted (no ticket). ms from the restarted process's spawn to "
                      "the first echoed UDP byte, including interpreter start-up; connect_ms: "
                      "the Agent's own connect start -> registration ACK",
        }
        self.step(True, f"Intermediate restart: Agent back with a {kept['handshake'] or '?'} "
                        f"handshake, connected in {kept['connect_ms']} ms, first echo "
                        f"{kept['echo_ms']:.0f} ms after the spawn; Agent restart: "
                        f"{fresh['handshake'] or '?'} handshake, {fresh['connect_ms']} ms, "
                        f"{fresh['echo_ms']:.0f} ms (spawn times include Python start-up)")

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        try:
            self.prepare()
            self.start_layout()
            self.start_backends()
            self.start_intermediate()
            self.start_connector()
            self.check_isolation()
            self.start_agent()
            self.result["pids"] = self.sup.pids()
            self.udp_test()
            self.wait_direct()
            self.http_test()
            self.name_test()
            self.icmp_test()
            self.reconnect_test()  # last: it restarts the Agent (path, RTT above: first run)
        except (DemoError, UsageError, OSError) as exc:
            self.fail(str(exc))
        finally:
            self.teardown()
        r = self.result
        r["ok"] = bool(not r["errors"] and r["http_sha256_ok"] and r["http_bytes"] == self.o.size
                       and r["by_name_ok"]
                       and r["udp_echo_ok"] and r["icmp_ok"] is not False
                       and r["isolated"] is not False)
        return r

    def teardown(self) -> None:
        # A second Ctrl-C while cleaning up must not leave namespaces behind.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self.sup.stop_all()
            problems = self.layout.down()
            for p in problems:
                self.fail(f"teardown: {p}")
            if self.o.keep:
                self.step(None, f"kept {self.tmp} (logs in {self.tmp / 'logs'})")
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)


def run_demo(options: DemoOptions, emit: Emit | None = None) -> dict[str, Any]:
    """Run the demo once; raises UsageError for impossible options (e.g. --lab without root)."""
    demo = Demo(options, emit or (lambda ok, text: None))
    return demo.run()
