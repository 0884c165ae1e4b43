"""Where the demo's components run: on loopback, in two namespaces, or in the lab.

A layout answers three questions for the runner: in which network namespace does a role
run (``ns(role)``, roles: intermediate, connector, backends, agent), which addresses do
they use to reach each other, and how to run a blocking function "from" a role
(``call(role, fn)``: directly, or in a thread that entered the namespace).

* ``LocalLayout``: no namespaces, every socket on 127.0.0.1 with ephemeral ports (so two
  demos, or a demo next to a real deployment, never collide). No root needed.
* ``NetnsLayout``: namespaces ``<p>-pub`` and ``<p>-agent`` joined by one veth
  (10.99.0.1/24 and 10.99.0.2/24, fd00:99::1/2). Nothing is added to the root namespace,
  so the host's interfaces and routes stay untouched; deleting the namespaces removes
  the veth and the Agent's TUN with them.
* ``LabLayout``: ``ztna.lab.Lab``: Intermediate on relay, Connector on conn, backends on
  app, Agent on agent; NATs, IP family, delay and loss from the flags.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from typing import Any, TypeVar

from ztna.errors import UsageError
from ztna.lab.config import base36

T = TypeVar("T")
ROLES = ("intermediate", "connector", "backends", "agent")


def default_prefix() -> str:
    """Short and unique per demo process (namespace and lab names)."""
    return f"zd{base36(os.getpid())}"[:8]


def host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Layout:
    name = "base"
    tun = False
    intermediate_port = 4433       # what the Intermediate binds (0 = ephemeral)
    p2p_port = "4434"
    listen_host = "::"            # Intermediate bind address
    backend_host = "127.0.0.1"    # backends bind here; the Connector reaches them here

    def up(self) -> None:  # noqa: B027 - optional hook
        pass

    def down(self) -> list[str]:
        return []

    def ns(self, role: str) -> str | None:
        return None

    def runner(self, role: str) -> Callable[..., subprocess.Popen[bytes]] | None:
        ns = self.ns(role)
        if ns is None:
            return None

        def run(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
            return subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)

        return run

    def call(self, role: str, fn: Callable[[], T]) -> T:
        ns = self.ns(role)
        if ns is None:
            return fn()
        from ztna.lab.netns import in_netns

        return in_netns(ns, fn)

    def intermediate_for(self, role: str, port: int) -> str:
        """The HOST:PORT a Connector or Agent dials."""
        return host_port("127.0.0.1", port)

    def describe(self) -> dict[str, Any] | None:
        return None


class LocalLayout(Layout):
    name = "local"
    intermediate_port = 0
    p2p_port = "0"
    listen_host = "127.0.0.1"


class NetnsLayout(Layout):
    name = "netns"
    tun = True
    listen_host = "0.0.0.0"

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.pub = f"{prefix}-pub"
        self.agent = f"{prefix}-agent"

    def up(self) -> None:
        from ztna.lab import netns

        self.down()
        netns.run(["ip", "-batch", "-"], stdin=f"netns add {self.pub}\nnetns add {self.agent}\n")
        netns.run(["ip", "-n", self.pub, "-batch", "-"], stdin=(
            "link set lo up\n"
            f"link add veth0 type veth peer name veth0 netns {self.agent}\n"
            "addr add 10.99.0.1/24 dev veth0\n"
            "addr add fd00:99::1/64 dev veth0 nodad\n"
            "link set veth0 up\n"))
        netns.run(["ip", "-n", self.agent, "-batch", "-"], stdin=(
            "link set lo up\n"
            "addr add 10.99.0.2/24 dev veth0\n"
            "addr add fd00:99::2/64 dev veth0 nodad\n"
            "link set veth0 up\n"))

    def down(self) -> list[str]:
        from ztna.lab import netns

        problems: list[str] = []
        for ns in (self.agent, self.pub):
            inside = [(pid, netns.start_time(pid)) for pid in netns.netns_pids(ns)]
            problems += [f"pid {pid} in {ns} survived SIGKILL" for pid in netns.terminate(inside)]
            if netns.ns_exists(ns):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
            if netns.ns_exists(ns):
                problems.append(f"namespace {ns} still exists")
        return problems

    def ns(self, role: str) -> str | None:
        return self.agent if role == "agent" else self.pub

    def intermediate_for(self, role: str, port: int) -> str:
        return host_port("10.99.0.1" if role == "agent" else "127.0.0.1", port)

    def describe(self) -> dict[str, Any]:
        return {"namespaces": [self.pub, self.agent], "link": "veth 10.99.0.1 <-> 10.99.0.2"}


class LabLayout(Layout):
    name = "lab"
    tun = True

    NODE = {"intermediate": "relay", "connector": "conn", "backends": "app", "agent": "agent"}

    def __init__(self, prefix: str, *, nat_a: str, nat_b: str, ip: str, delay_ms: float,
                 loss_pct: float) -> None:
        from ztna.lab import Lab, LabConfig

        if ip == "6":
            ip = "6only"
        self.lab = Lab(LabConfig(prefix=prefix, nat_a=nat_a, nat_b=nat_b, ip=ip,
                                 delay_ms=delay_ms, loss_pct=loss_pct))
        cfg = self.lab.config
        self.family = 4 if cfg.v4 else 6
        self.listen_host = "::" if cfg.v6 else "0.0.0.0"
        self.backend_host = self.lab.addr("app", self.family)

    def up(self) -> None:
        self.lab.up()

    def down(self) -> list[str]:
        try:
            self.lab.down()
        except UsageError as exc:
            return [str(exc)]
        return []

    def ns(self, role: str) -> str | None:
        return self.lab.ns(self.NODE[role])

    def runner(self, role: str) -> Callable[..., subprocess.Popen[bytes]] | None:
        node = self.NODE[role]

        def run(argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
            return self.lab.spawn(node, argv, **kw)

        return run

    def intermediate_for(self, role: str, port: int) -> str:
        return host_port(self.lab.addr("relay", self.family), port)

    def describe(self) -> dict[str, Any]:
        cfg = self.lab.config
        return {"prefix": cfg.prefix, "nat_a": cfg.nat_a, "nat_b": cfg.nat_b, "ip": cfg.ip,
                "delay_ms": cfg.delay_ms, "loss_pct": cfg.loss_pct,
                "nodes": {role: node for role, node in self.NODE.items()}}


def can_tun() -> str | None:
    """None if TUN mode in namespaces can run here, else the reason it cannot."""
    import shutil

    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "the 'ip' tool (iproute2) is missing"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


def require(reason: str | None, what: str) -> None:
    if reason is not None:
        raise UsageError(f"{what} needs root with iproute2 and /dev/net/tun ({reason})")
