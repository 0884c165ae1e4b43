"""The namespace world of the Connector's TUN tests, reusable by tests and bench/ (root only).

One fresh network namespace with everything on its loopback: Intermediate, Connector,
http.server and a sha256 sink as backends, a UDP echo, and the TUN Agent bridge
(`ztna.worlds.tun_bridge`) so the kernel's TCP (curl / Python sockets) talks through the tunnel.
The P2P port is dropped by one global nftables rule (relay traffic only); `Ns.loss(N)`
drops N % of the UDP datagrams to and from the Intermediate (`numgen random mod 100`),
i.e. on the relay path, both directions.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ztna import procs
from ztna.certs import init_pki

PY = sys.executable
ZTNA = str(Path(sys.executable).parent / "ztna")
INTER, HTTP, SINK, P2P, METRICS = 14433, 18080, 18081, 4434, 19091


class Ns:
    def __init__(self, name: str, tmp: Path) -> None:
        self.name, self.tmp = name, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, "sh", "-c", cmd],
                              capture_output=True, text=True, **kw)  # type: ignore[call-overload]

    def spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        p = procs.spawn(args, log=self.tmp / f"{log}.out", netns=self.name)
        self.procs.append(p)
        return p

    def loss(self, percent: int) -> None:
        self.run("nft delete table inet loss 2>/dev/null; true")
        if percent:
            r = self.run(f"nft add table inet loss && nft add chain inet loss in "
                         f"'{{ type filter hook input priority 0; }}' && nft add rule inet loss in "
                         f"udp dport {INTER} numgen random mod 100 '<' {percent} drop && "
                         f"nft add rule inet loss in udp sport {INTER} numgen random mod 100 '<' "
                         f"{percent} drop")
            assert r.returncode == 0, r.stderr


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    procs.wait_until(cond, timeout=timeout, what=f"timed out waiting for {what}", interval=0.1,
                     error=AssertionError)


def start_world(tmp: Path, name: str, connector_args: tuple[str, ...] = ()) -> Ns:
    """Build the namespace `name` and start every process; `stop_world` undoes it."""
    pki = tmp / "pki"
    init_pki(pki, ["web", "echo"])
    subprocess.run(["ip", "netns", "add", name], check=True)
    ns = Ns(name, tmp)
    try:
        ns.run("ip link set lo up")
        # One global rule, no interface match: every UDP datagram to the P2P port is dropped.
        r = ns.run(f"nft add table inet p2pdrop && nft add chain inet p2pdrop in "
                   f"'{{ type filter hook input priority 0; }}' && "
                   f"nft add rule inet p2pdrop in udp dport {P2P} drop")
        assert r.returncode == 0, r.stderr
        www = tmp / "www"
        www.mkdir(exist_ok=True)
        ns.spawn([PY, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www),
                  str(HTTP)], "http")
        ns.spawn([PY, "-m", "ztna.worlds.sha_sink", str(SINK)], "sink")
        ns.spawn([PY, "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                  "s.bind(('127.0.0.1',17007))\nwhile 1:\n d,a=s.recvfrom(65535); s.sendto(d,a)"],
                 "udpecho")
        ns.spawn([ZTNA, "intermediate", "--listen", f"127.0.0.1:{INTER}", "--pki", str(pki),
                  "--metrics", "off"], "intermediate")
        time.sleep(1.0)
        ns.spawn([ZTNA, "connector", "--intermediate", f"127.0.0.1:{INTER}", "--server-name",
                  "localhost", "--pki", str(pki), "--p2p-port", str(P2P), "--metrics",
                  f"127.0.0.1:{METRICS}", "--service",
                  f"web=10.100.0.2,fd00:100::2;tcp:80=127.0.0.1:{HTTP};tcp:81=127.0.0.1:{SINK}",
                  "--service", "echo=10.100.0.3;udp:7=127.0.0.1:17007", *connector_args],
                 "connector")
        wait_for(lambda: '"ok": true' in ns.run(f"curl -s 127.0.0.1:{METRICS}/healthz").stdout,
                 "connector healthz")
        bridge = ns.spawn([PY, "-m", "ztna.worlds.tun_bridge", "127.0.0.1", str(INTER), str(pki),
                           "web=10.100.0.2/32,fd00:100::2/128", "echo=10.100.0.3/32"], "bridge")
        wait_for(lambda: b"READY" in (tmp / "bridge.out").read_bytes(), "TUN bridge")
        assert bridge.poll() is None
    except BaseException:
        stop_world(ns)
        raise
    return ns


def stop_world(ns: Ns) -> None:
    procs.stop_all(ns.procs, grace=5)
    subprocess.run(["ip", "netns", "del", ns.name])


def make_file(ns: Ns, size: int) -> str:
    path = ns.tmp / "www" / f"f{size}"
    if not path.exists():
        path.write_bytes(os.urandom(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(ns: Ns, size: int, url_host: str = "10.100.0.2") -> float:
    """curl through the TUN, sha256-checked; returns seconds."""
    want = make_file(ns, size)
    t0 = time.monotonic()
    r = ns.run(f"curl -sS --max-time 600 http://{url_host}/f{size} | sha256sum", timeout=700)
    dt = time.monotonic() - t0
    assert r.stdout.split()[0] == want, r.stderr
    return dt


def upload(ns: Ns, size: int) -> float:
    """The kernel's TCP sends `size` random bytes to the sha256 sink; returns seconds."""
    src = ns.tmp / f"up{size}"
    if not src.exists():
        src.write_bytes(os.urandom(size))
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    t0 = time.monotonic()
    r = ns.run(f"{PY} -c \"import socket,sys\ns=socket.create_connection(('10.100.0.2',81))\n"
               f"s.sendall(open('{src}','rb').read()); s.shutdown(socket.SHUT_WR)\n"
               f"print(s.makefile().read())\"", timeout=700)
    dt = time.monotonic() - t0
    assert r.stdout.split()[:2] == [want, str(size)], r.stdout + r.stderr
    return dt


def stream(ns: Ns, mode: str, size: int) -> float:
    """One TCP-carrying QUIC stream (get: HTTP download, upload: to the sink); seconds."""
    if mode == "get":
        want = make_file(ns, size)
        r = ns.run(f"{PY} -m ztna.worlds.stream_client 127.0.0.1 {INTER} "
                   f"{ns.tmp / 'pki'} web 10.100.0.2 80 get /f{size}", timeout=700)
        assert f"SHA256 {want}" in r.stdout and "STATUS 0" in r.stdout, r.stdout + r.stderr
    else:
        pattern = (bytes(range(256)) * 256)
        h = hashlib.sha256()
        left = size
        while left:
            h.update(pattern[:min(left, len(pattern))])
            left -= min(left, len(pattern))
        r = ns.run(f"{PY} -m ztna.worlds.stream_client 127.0.0.1 {INTER} "
                   f"{ns.tmp / 'pki'} web 10.100.0.2 81 upload {size}", timeout=700)
        assert f"REPLY {h.hexdigest()} {size}" in r.stdout, r.stdout + r.stderr
    return float(r.stdout.split("SECONDS")[1].split()[0])
