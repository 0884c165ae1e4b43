"""Intermediate + Connector + TUN-mode Agent in a `ztna.lab` topology, with an HTTP backend.

Shared by the TUN and P2P lab tests and bench/carriage.py, bench/datapath.py. The app host serves
`www/` (random files, sha256 known) with `http.server`; the Connector exposes it as
`web` port 80 on 10.100.0.2 and fd00:100::2; the Agent runs in TUN mode in the agent
namespace with the requested `--tcp-transport`. `curl_sha` downloads through the TUN.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ztna import procs
from ztna.certs import init_pki

PY = sys.executable
VIP4, VIP6 = "10.100.0.2", "fd00:100::2"
AGENT_NAME = "lab"


def make_files(www: Path, sizes: dict[str, int]) -> dict[str, str]:
    www.mkdir(parents=True, exist_ok=True)
    digests = {}
    for name, size in sizes.items():
        path = www / name
        if not path.exists() or path.stat().st_size != size:
            with open(path, "wb") as fh:
                left = size
                while left:
                    chunk = os.urandom(min(left, 1 << 20))
                    fh.write(chunk)
                    left -= len(chunk)
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        digests[name] = h.hexdigest()
    return digests


class World:
    def __init__(self, lab: Any, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pki = workdir / "pki"
        self.state = workdir / "state"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.agent: subprocess.Popen[bytes] | None = None
        fam = 6 if lab.config.ip == "6only" else 4
        relay = lab.addr("relay", fam)
        self.app = lab.addr("app", fam)
        self.inter = f"[{relay}]:4433" if ":" in relay else f"{relay}:4433"
        self.v6 = lab.config.ip != "4"
        self.vips = [VIP4, VIP6] if self.v6 else [VIP4]
        self.agent_runs = 0

    def spawn(self, node: str, argv: list[str], name: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        p = procs.spawn(argv, log=self.logs / f"{name}.log", append=True, env=env,
                        popen=functools.partial(self.lab.spawn, node))
        self.procs.append(p)
        return p

    def start_infra(self, www: Path) -> None:
        if not (self.pki / "ca.pem").exists():
            init_pki(self.pki, ["web"], hosts=["ztna-intermediate"])
        bind = "::" if ":" in self.app else self.app
        self.spawn("app", [PY, "-m", "http.server", "--bind", bind, "8080", "--directory", str(www)], "http")
        self.spawn("relay", [PY, "-m", "ztna", "intermediate", "--pki", str(self.pki), "--metrics", "off"],
                   "intermediate")
        time.sleep(0.5)
        backend = f"[{self.app}]:8080" if ":" in self.app else f"{self.app}:8080"
        self.spawn("conn", [PY, "-m", "ztna", "connector", "--intermediate", self.inter,
                            "--server-name", "ztna-intermediate", "--pki", str(self.pki), "--metrics", "off",
                            "--service", f"web={','.join(self.vips)};tcp:80={backend}"], "connector")
        time.sleep(0.5)

    def start_agent(self, transport: str) -> subprocess.Popen[bytes]:
        self.agent_runs += 1
        self.agent = self.spawn("agent", [
            PY, "-m", "ztna", "agent", "--intermediate", self.inter, "--server-name", "ztna-intermediate",
            "--pki", str(self.pki), "--service", f"web={','.join(self.vips)}", "--mode", "tun",
            "--name", AGENT_NAME, "--tun-name", "ztna0", "--state-dir", str(self.state),
            "--tcp-transport", transport], f"agent-{self.agent_runs}-{transport}")
        return self.agent

    def stop_agent(self, *, kill: bool = False) -> None:
        p = self.agent
        if p is None:
            return
        procs.stop(p, grace=15, sig=signal.SIGKILL if kill else signal.SIGTERM)
        self.agent = None

    def status(self) -> dict[str, Any] | None:
        r = self.lab.run("agent", [PY, "-m", "ztna", "status", "--json", "--state-dir", str(self.state),
                                   "--name", AGENT_NAME], check=False)
        if r.returncode != 0:
            return None
        try:
            data = json.loads(r.stdout)
        except ValueError:
            return None
        return data[0] if isinstance(data, list) else data

    def wait(self, path: str | None, timeout: float = 20.0) -> dict[str, Any]:
        """Until the service is registered and on `path` ("relay", "direct"; None: either)."""
        deadline = time.monotonic() + timeout
        snap: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"agent exited {self.agent.returncode}: {self.agent_log()[-2000:]}")
            snap = self.status()
            svc = (snap or {}).get("services") or [{}]
            if svc[0].get("registration") == "acked" and path in (None, svc[0].get("path")):
                return snap  # type: ignore[return-value]
            time.sleep(0.1)
        raise AssertionError(f"path never became {path}: {json.dumps(snap)[:1500]}")

    def agent_log(self) -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in sorted(self.logs.glob(f"agent-{self.agent_runs}-*.log")))

    def curl(self, url: str, *, max_time: float = 60, extra: tuple[str, ...] = (),
             out: Path | None = None) -> dict[str, Any]:
        """Download through the TUN: sha256 of the body, curl's timing and exit code
        (concurrent downloads each need their own `out`)."""
        out = out or self.workdir / "curl.out"
        out.unlink(missing_ok=True)
        fmt = '{"code":%{http_code},"time_total":%{time_total},"speed":%{speed_download},"size":%{size_download}}'
        r = self.lab.run("agent", ["curl", "-sS", "-g", "--max-time", str(max_time), "-o", str(out),
                                   "-w", fmt, *extra, url], check=False, timeout=max_time + 30)
        try:
            info = json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {}
        except ValueError:
            info = {}
        sha = ""
        if out.exists():
            h = hashlib.sha256()
            with open(out, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            sha = h.hexdigest()
        return {"rc": r.returncode, "stderr": r.stderr.strip(), "sha256": sha, **info}

    def nft_tables(self) -> str:
        return self.lab.run("agent", ["nft", "list", "tables"]).stdout

    def close(self) -> None:
        procs.stop_all(self.procs, grace=10)


@contextmanager
def tun_world(lab: Any, workdir: Path, www: Path) -> Iterator[World]:
    world = World(lab, workdir)
    try:
        world.start_infra(www)
        yield world
    finally:
        world.close()
