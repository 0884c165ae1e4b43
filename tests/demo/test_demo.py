"""`ztna demo` as a newcomer runs it: a subprocess, its one JSON object, its exit status.

Non-root run: as user `nobody` (setpriv) when this interpreter can be executed by
nobody; otherwise (e.g. a venv whose interpreter lives under a 0700 /root) as root with
ZTNA_DEMO_MODE=userspace, which the demo honours exactly like a missing root.
Root runs: TUN mode in two namespaces, and the lab with two cone NATs.
Every run checks byte-exactness (sha256, echo), that the children are gone, that the
temp dir was removed, and that no namespace was left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SIZE = 2_000_000
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def _nobody_can_spawn_python() -> bool:
    """Can user nobody run this interpreter, and can it start children of itself?"""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    probe = "import subprocess, sys; subprocess.run([sys.executable, '-c', '0'], check=True)"
    proc = subprocess.run([*NOBODY, sys.executable, "-c", probe], capture_output=True, cwd="/tmp")
    return proc.returncode == 0


def run_demo(*args: str, as_nobody: bool = False, env: dict[str, str] | None = None,
             timeout: float = 90) -> tuple[int, dict[str, Any], str]:
    argv = [sys.executable, "-m", "ztna", "demo", "--json", "--size", str(SIZE), *args]
    if as_nobody:
        argv = [*NOBODY, *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/tmp",
                          env={**os.environ, **(env or {})})
    # The whole of stdout must be exactly one JSON object.
    result = json.loads(proc.stdout)
    return proc.returncode, result, proc.stderr


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def check_common(code: int, r: dict[str, Any], stderr: str) -> None:
    assert r["errors"] == [], (r["errors"], stderr)
    assert r["ok"] is True and code == 0
    assert r["http_bytes"] == SIZE and r["http_expected_bytes"] == SIZE
    assert r["http_sha256_ok"] is True
    assert r["udp_echo_ok"] is True
    assert r["http_mbps"] > 0
    assert r["path"] in ("relay", "direct")
    assert (r["warmup_ms"] is not None) == (r["path"] == "direct")
    assert not Path(r["workdir"]).exists(), "temp dir left behind"
    for name, pid in r["pids"].items():
        stat = Path(f"/proc/{pid}/stat")
        gone = not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        assert gone, f"{name} (pid {pid}) still running"
    assert set(r["pids"]) == {"backends", "intermediate", "connector", "agent"}
    # One app reached by DNS name, resolved at the Connector, sha256-exact.
    assert r["by_name_ok"] is True and r["by_name_address"]


def test_demo_userspace_without_root() -> None:
    nobody = _nobody_can_spawn_python()
    env = None if nobody else {"ZTNA_DEMO_MODE": "userspace"}
    code, r, err = run_demo(as_nobody=nobody, env=env)
    check_common(code, r, err)
    assert r["mode"] == "userspace" and r["layout"] == "local"
    assert r["icmp_ok"] is None  # not tried without TUN
    rc = r["reconnect_ms"]
    assert rc["zero_rtt"] > 0 and rc["full"] > 0
    assert rc["handshake"]["full"] == "full"  # a new Agent process holds no ticket
    assert rc["handshake"]["zero_rtt"] in ("0-RTT", "resumed")  # the running one resumed


@pytest.mark.root
def test_demo_tun_in_namespaces() -> None:
    code, r, err = run_demo("--no-reconnect")
    check_common(code, r, err)
    assert r["mode"] == "tun" and r["layout"] == "netns"
    assert r["icmp_ok"] is True and r["icmp_rtt_ms"] > 0
    assert r["reconnect_ms"] is None
    assert len(r["namespaces"]) == 2
    if shutil.which("nft"):
        assert r["tcp_carriage"] == "stream"
        assert r["by_name_address"].startswith("100.80.")     # the Agent's synthetic answer
    assert not set(r["namespaces"]) & _netns_names(), "namespaces left behind"


def _path_without(tmp: Path, *hidden: str) -> str:
    """A PATH of symlinks to every program on the current PATH except ``hidden``: a fresh
    system where those packages are not installed."""
    bindir = tmp / "bin"
    bindir.mkdir()
    for d in os.environ.get("PATH", "").split(os.pathsep):
        if not d or not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = bindir / name
            if name in hidden or name.startswith("ping") or target.exists():
                continue
            target.symlink_to(os.path.join(d, name))
    return str(bindir)


@pytest.mark.root
def test_demo_tun_without_ping_or_nft(tmp_path: Path) -> None:
    path = _path_without(tmp_path, "nft", "ping", "ping4", "ping6")
    assert shutil.which("ping", path=path) is None and shutil.which("nft", path=path) is None
    code, r, err = run_demo("--no-reconnect", env={"PATH": path})
    check_common(code, r, err)
    assert r["mode"] == "tun" and r["layout"] == "netns"
    assert r["by_name_address"] == "files.apps.demo"      # no redirect: by SOCKS5 with the name
    # the echo is sent from the Agent's namespace with our own ICMP socket, payload checked
    assert r["icmp_ok"] is True and r["icmp_rtt_ms"] > 0
    assert r["tcp_carriage"] == "datagram"
    notes = "\n".join(r["notes"])
    assert "install nftables" in notes and "TCP carriage: datagram" in notes, notes
    assert not set(r["namespaces"]) & _netns_names(), "namespaces left behind"


@pytest.mark.root
def test_demo_lab_cone_cone() -> None:
    code, r, err = run_demo("--lab", "--nat-a", "cone", "--nat-b", "cone", "--no-reconnect")
    check_common(code, r, err)
    assert r["mode"] == "tun" and r["layout"] == "lab"
    assert r["isolated"] is True  # the Agent could not reach the app except through the tunnel
    assert r["icmp_ok"] is True
    lab = r["lab"]
    assert (lab["nat_a"], lab["nat_b"], lab["ip"]) == ("cone", "cone", "4")
    assert not any(n.startswith(lab["prefix"] + "-") for n in _netns_names()), "lab left behind"


def test_demo_refuses_lab_flags_without_lab() -> None:
    proc = subprocess.run([sys.executable, "-m", "ztna", "demo", "--nat-a", "cone"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "--lab" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0 or not _nobody_can_spawn_python(),
                    reason="needs root to switch to user nobody, and an interpreter nobody can run")
def test_demo_lab_without_root_is_a_usage_error() -> None:
    proc = subprocess.run([*NOBODY, sys.executable, "-m", "ztna", "demo", "--lab", "--json"],
                          capture_output=True, text=True, timeout=30, cwd="/tmp")
    assert proc.returncode == 2
    r = json.loads(proc.stdout)
    assert r["ok"] is False and "root" in r["errors"][0]
