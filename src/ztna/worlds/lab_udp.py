"""Run Intermediate + Connector + Agent in a `ztna.lab` topology (shared by the lab tests
and bench/p2p_warmup.py). UDP echo backend on the app host; the Agent in userspace mode
with a UDP forward; the status JSON tells the path and the warm-up."""

from __future__ import annotations

import functools
import json
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
ECHO = ("import socket,sys\n"
        "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.bind((sys.argv[1],int(sys.argv[2])))\n"
        "while True:\n d,a=s.recvfrom(65535); s.sendto(d,a)\n")
CLIENT = ("import socket,sys,hashlib,os,time\n"
          "s=socket.socket(); s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2)\n"
          "ok=0\n"
          "for i in range(int(sys.argv[2])):\n"
          " p=os.urandom(1000); s.sendto(p,('127.0.0.1',int(sys.argv[1])))\n"
          " try:\n  d,_=s.recvfrom(65535)\n except OSError:\n  continue\n"
          " ok+= hashlib.sha256(d).digest()==hashlib.sha256(p).digest()\n"
          " time.sleep(float(sys.argv[3]))\n"
          "print(ok)\n")


@contextmanager
def ztna_world(lab: Any, workdir: Path, *, agent_port: int = 15353) -> Iterator[dict[str, Any]]:
    pki = workdir / "pki"
    if not (pki / "ca.pem").exists():
        init_pki(pki, ["web"], hosts=["ztna-intermediate"])
    v6only = lab.config.ip == "6only"
    fam = 6 if v6only else 4
    relay = lab.addr("relay", fam)
    app = lab.addr("app", fam)
    inter_hp = f"[{relay}]:4433" if ":" in relay else f"{relay}:4433"
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []

    def spawn(node: str, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        p = procs.spawn(argv, log=logs / f"{name}.log", popen=functools.partial(lab.spawn, node))
        children.append(p)
        return p

    try:
        spawn("app", [PY, "-c", ECHO, app, "5353"], "echo")
        spawn("relay", [PY, "-m", "ztna", "intermediate", "--pki", str(pki), "--metrics", "off"],
              "intermediate")
        time.sleep(0.5)
        vip = "10.100.0.2"
        spawn("conn", [PY, "-m", "ztna", "connector", "--intermediate", inter_hp,
                       "--server-name", "ztna-intermediate", "--pki", str(pki), "--metrics", "off",
                       "--service", f"web={vip};udp:53=[{app}]:5353" if ":" in app else
                       f"web={vip};udp:53={app}:5353"], "connector")
        time.sleep(0.5)
        state = workdir / "state"
        spawn("agent", [PY, "-m", "ztna", "agent", "--intermediate", inter_hp,
                        "--server-name", "ztna-intermediate", "--pki", str(pki),
                        "--service", f"web={vip}", "--mode", "userspace", "--name", "lab",
                        "--state-dir", str(state), "-U", f"127.0.0.1:{agent_port}=web:53"], "agent")
        yield {"lab": lab, "state": state, "port": agent_port, "logs": logs}
    finally:
        procs.stop_all(children, grace=10)


def agent_status(world: dict[str, Any]) -> dict[str, Any] | None:
    r = world["lab"].run("agent", [PY, "-m", "ztna", "status", "--json", "--state-dir",
                                   str(world["state"]), "--name", "lab"], check=False)
    if r.returncode != 0:
        return None
    try:
        data = json.loads(r.stdout)
    except ValueError:
        return None
    return data[0] if isinstance(data, list) else data


def wait_path(world: dict[str, Any], want: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    snap: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        snap = agent_status(world)
        if snap and snap.get("services") and snap["services"][0].get("path") == want:
            if want != "direct" or snap.get("warmup_ms") is not None:
                return snap
        time.sleep(0.1)
    raise AssertionError(f"path never became {want}: {json.dumps(snap)[:2000]}")


def udp_echo(world: dict[str, Any], count: int = 20, gap: float = 0.01) -> int:
    r = world["lab"].run("agent", [PY, "-c", CLIENT, str(world["port"]), str(count), str(gap)],
                         timeout=120)
    return int(r.stdout.strip() or 0)
