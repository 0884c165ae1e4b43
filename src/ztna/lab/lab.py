"""``Lab``: build, drive and tear down one lab (see ``config`` for the picture).

Life cycle. ``up()`` first tears down any leftover lab with the same prefix (a
crashed run), then builds: one ``ip -batch`` for the namespaces, sysctls written
from a thread inside each namespace, one ``ip -n NS -batch`` per node, ``nft -f``
on the NATs, ``tc`` for a rate, and a ``delaywire`` per WAN link for delay/jitter.
That takes well under a second. A failed build is torn down before the error
propagates.

State. Everything another process needs to clean up (config, tracked processes
with their start times, UDP blocks, runtime loss) is written to
``/run/ztna-lab/<prefix>.json`` after every change, so ``ztna lab down`` works from
any shell and ``Lab.attach(prefix)`` picks up a running lab.

Teardown (``down()``, idempotent): SIGTERM then SIGKILL every tracked process and
check it is gone, do the same for any process still inside one of the lab's
namespaces (processes keep a deleted namespace alive), then delete the namespaces,
which removes every veth, bridge and TAP with them. Nothing lives in the root
namespace, so nothing needs removing there. Delay wires run inside ``<prefix>-inet``
so the namespace sweep finds them even when the state file is lost.

Impairments. ``delay_ms``/``jitter_ms`` are one-way per WAN link: agent<->relay RTT is
about 2 x delay and agent<->connector RTT about 4 x delay. ``loss_pct`` applies in
each direction of each WAN link (a round trip through one NAT crosses it twice).
``rate`` is a tbf at both ends of each WAN link.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from types import TracebackType
from typing import Any, Final

import ztna.lab.netns as netns
from ztna.errors import UsageError
from ztna.lab.config import NODES, LabConfig, node_addr
from ztna.lab.rules import BLOCK_DIRECTIONS, block_ruleset, firewall_ruleset, loss_lines
from ztna.lab.topology import batches, nat_sysctls, ns_name, sysctls

STATE_DIR: Final = "/run/ztna-lab"
WIRE_READY_TIMEOUT: Final = 5.0  # s for a delaywire to open both TAPs
TBF: Final = ("burst", "64kb", "latency", "100ms")


def require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("the ztna lab needs root (network namespaces, nftables): run as root")
    missing = [tool for tool in ("ip", "nft", "conntrack") if shutil.which(tool) is None]
    if missing:
        raise UsageError(
            f"the ztna lab needs {', '.join(missing)} (apt-get install iproute2 nftables conntrack)"
        )


def state_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}.json")


def wire_log(prefix: str, router: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}-wire-{router}.log")


def load_state(prefix: str) -> dict[str, Any] | None:
    try:
        with open(state_path(prefix)) as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def teardown(prefix: str, extra: list[tuple[int, int | None]] | None = None) -> list[str]:
    """Remove lab ``prefix`` whatever state it is in; returns problems left over."""
    state = load_state(prefix) or {}
    procs = list(extra or [])
    procs += [(p["pid"], p.get("start")) for p in state.get("processes", [])]
    problems = [f"pid {pid} survived SIGKILL" for pid in netns.terminate(procs)]
    names = [ns_name(prefix, n) for n in NODES]
    for _ in range(3):  # a dying process may have forked once more
        inside = [(pid, netns.start_time(pid)) for name in names for pid in netns.netns_pids(name)]
        if not inside:
            break
        netns.terminate(inside)
    present = [name for name in names if netns.ns_exists(name)]
    if present:
        subprocess.run(
            ["ip", "-force", "-batch", "-"],
            input="".join(f"netns del {name}\n" for name in present),
            capture_output=True,
            text=True,
            timeout=30,
        )
    problems += [f"namespace {name} still exists" for name in names if netns.ns_exists(name)]
    for leftover in [state_path(prefix)] + [wire_log(prefix, r) for r in ("nata", "natb")]:
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass
    return problems


class Lab:
    """One lab; a context manager (``with Lab(LabConfig(prefix="t1")) as lab: ...``)."""

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.loss_pct = config.loss_pct
        self._procs: list[dict[str, Any]] = []
        self._popens: dict[int, subprocess.Popen[Any]] = {}
        self._blocks: dict[str, list[tuple[int, str]]] = {}

    # ------------------------------------------------------------------ life cycle
    @classmethod
    def attach(cls, prefix: str) -> Lab:
        """The running lab ``prefix``, as recorded in its state file."""
        state = load_state(prefix)
        if state is None:
            raise UsageError(f"no lab {prefix!r} is up (no {state_path(prefix)})")
        lab = cls(LabConfig.from_dict(state["config"]))
        lab.loss_pct = float(state.get("loss_pct", lab.config.loss_pct))
        lab._procs = list(state.get("processes", []))
        blocks = state.get("blocks", {})
        lab._blocks = {n: [(int(p), str(d)) for p, d in b] for n, b in blocks.items()}
        return lab

    def up(self) -> Lab:
        require_root()
        teardown(self.config.prefix)
        self._procs, self._popens, self._blocks = [], {}, {}
        self.loss_pct = self.config.loss_pct
        try:
            self._build()
        except BaseException:
            try:
                self.down()
            except UsageError:  # report the build error, not a follow-on teardown error
                pass
            raise
        self._save()
        return self

    def down(self) -> None:
        own = [(p["pid"], p.get("start")) for p in self._procs]
        problems = teardown(self.config.prefix, own)
        for popen in self._popens.values():  # reap our own children (no zombies left)
            try:
                popen.wait(timeout=1)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {popen.pid} not reaped")
        self._procs, self._popens = [], {}
        if problems:
            raise UsageError(
                f"lab {self.config.prefix!r} teardown incomplete: {'; '.join(problems)}"
            )

    def __enter__(self) -> Lab:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def _build(self) -> None:
        cfg = self.config
        netns.run(["ip", "-batch", "-"], stdin="".join(f"netns add {self.ns(n)}\n" for n in NODES))
        for node in NODES:
            netns.write_sysctls(self.ns(node), sysctls(cfg, node))
        for node, script in batches(cfg):
            netns.run(["ip", "-n", self.ns(node), "-batch", "-"], stdin=script)
        for which in ("a", "b"):
            nat = self.ns("nat" + which)
            nft = ["ip", "netns", "exec", nat, "nft", "-f", "-"]
            netns.run(nft, stdin=firewall_ruleset(cfg, which))
            netns.write_sysctls(nat, nat_sysctls(cfg))
            if cfg.rate:
                tbf = ["qdisc", "replace", "root", "tbf", "rate", cfg.rate, *TBF]
                for ns, dev in ((nat, "wan"), (self.ns("inet"), "nat" + which)):
                    netns.run(["tc", "-n", ns, *tbf[:2], "dev", dev, *tbf[2:]])
        if cfg.delayed:
            for router in ("nata", "natb"):
                self._start_wire(router)

    def _start_wire(self, router: str) -> None:
        argv = [
            sys.executable, "-m", "ztna.lab.delaywire",
            "--a", f"{self.ns(router)}:wan", "--b", f"{self.ns('inet')}:{router}",
            "--delay-ms", str(self.config.delay_ms), "--jitter-ms", str(self.config.jitter_ms),
        ]  # fmt: skip
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(wire_log(self.config.prefix, router), "w") as log:
            # own session: a Ctrl-C in the shell that ran `ztna lab up` must not stop the wire
            proc = self.spawn(
                "inet", argv, stdout=subprocess.PIPE, stderr=log, start_new_session=True
            )
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], WIRE_READY_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            with open(log.name) as f:  # quoted: teardown removes the log file
                tail = f.read()[-500:].strip()
            raise UsageError(f"delaywire for {router} did not start: {tail or 'no output'}")

    # ------------------------------------------------------------------ queries
    def ns(self, node: str) -> str:
        if node not in NODES:
            raise UsageError(f"unknown lab node {node!r}; nodes are {', '.join(NODES)}")
        return ns_name(self.config.prefix, node)

    def addr(self, node: str, family: int = 4) -> str:
        return node_addr(self.config, node, family)

    def status(self) -> dict[str, Any]:
        cfg = self.config
        nodes = {}
        for node in NODES:
            name = self.ns(node)
            entry: dict[str, Any] = {"netns": name, "exists": netns.ns_exists(name)}
            for fam in (4, 6):
                ok = cfg.v4 if fam == 4 else cfg.v6
                entry[f"ipv{fam}"] = self.addr(node, fam) if ok else None
            nodes[node] = entry
        return {
            "prefix": cfg.prefix,
            "up": all(n["exists"] for n in nodes.values()),
            "config": cfg.to_dict(),
            "nodes": nodes,
            "nats": {w: {"mode": cfg.nat_mode(w), "nat66": cfg.nat66} for w in ("a", "b")},
            "impairments": {
                "delay_ms": cfg.delay_ms,
                "jitter_ms": cfg.jitter_ms,
                "loss_pct": self.loss_pct,
                "rate": cfg.rate,
                "udp_timeout": cfg.udp_timeout,
            },
            "processes": [
                {**p, "alive": netns.alive(p["pid"], p.get("start"))} for p in self._procs
            ],
            "blocks": {n: [list(b) for b in bl] for n, bl in self._blocks.items() if bl},
        }

    # ------------------------------------------------------------------ processes
    def _argv(self, node: str, argv: list[str]) -> list[str]:
        if not argv:
            raise UsageError("empty command")
        return ["ip", "netns", "exec", self.ns(node), *argv]

    def run(
        self, node: str, argv: list[str], *, check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` in ``node``; captures text output unless told otherwise."""
        if not {"stdout", "stderr", "capture_output"} & kw.keys():
            kw["capture_output"] = True
        if not {"text", "encoding", "universal_newlines"} & kw.keys():
            kw["text"] = True
        return subprocess.run(self._argv(node, argv), check=check, timeout=timeout, **kw)

    def spawn(self, node: str, argv: list[str], **popen_kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``node``; it is killed on ``down()`` (``ip netns exec`` execs,
        so the PID is the command's own)."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(node, argv), **popen_kw)
        self._popens[proc.pid] = proc
        self._procs.append(
            {"pid": proc.pid, "start": netns.start_time(proc.pid), "node": node, "argv": argv[:16]}
        )
        self._save()
        return proc

    # ------------------------------------------------------------------ impairments
    def flush_nat(self, which: str) -> None:
        """Drop every conntrack entry (= NAT mapping) in NAT ``which``: a NAT reboot."""
        self.config.nat_mode(which)  # validates
        self.run("nat" + which, ["conntrack", "-F"])

    def block_udp(self, node: str, port: int, *, direction: str = "in") -> None:
        if direction not in BLOCK_DIRECTIONS:
            raise UsageError(f"direction must be one of {'|'.join(BLOCK_DIRECTIONS)}")
        blocks = self._blocks.setdefault(node, [])
        if (port, direction) not in blocks:
            blocks.append((port, direction))
        self._apply_blocks(node)

    def unblock_udp(self, node: str, port: int) -> None:
        self._blocks[node] = [b for b in self._blocks.get(node, []) if b[0] != port]
        self._apply_blocks(node)

    def _apply_blocks(self, node: str) -> None:
        ruleset = block_ruleset(self._blocks.get(node, []))
        self.run(node, ["nft", "-f", "-"], input=ruleset)
        self._save()

    def set_loss(self, pct: float) -> None:
        """Change the WAN loss of both NATs at runtime (atomic nft table swap)."""
        ruleset = "\n".join(loss_lines(pct)) + "\n"
        for which in ("a", "b"):
            self.run("nat" + which, ["nft", "-f", "-"], input=ruleset)
        self.loss_pct = float(pct)
        self._save()

    # ------------------------------------------------------------------ state file
    def _save(self) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        data = {
            "config": self.config.to_dict(),
            "loss_pct": self.loss_pct,
            "processes": self._procs,
            "blocks": {n: [list(b) for b in bl] for n, bl in self._blocks.items()},
            "saved_at": time.time(),
        }
        tmp = state_path(self.config.prefix) + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, state_path(self.config.prefix))
