"""Real processes in a network namespace (root): Intermediate, Connector, http.server and a
sha256 sink as backends, the TUN Agent bridge, and the kernel's TCP (curl / Python sockets).

Everything runs inside one fresh namespace on its loopback; the P2P port is dropped by one
global nftables rule for the whole test (relay traffic must not care), and loss is injected
with `numgen random mod 100 < N drop` on the Intermediate's UDP port.
Default run: 8 MB each way. ZTNA_SLOW=1 adds the 100 MB runs with 0 % and 3 % loss.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztna.certs import init_pki

HERE = Path(__file__).parent
PY = sys.executable
ZTNA = str(Path(sys.executable).parent / "ztna")
INTER, HTTP, SINK, P2P, METRICS = 14433, 18080, 18081, 4434, 19091

pytestmark = pytest.mark.root


class Ns:
    def __init__(self, name: str, tmp: Path) -> None:
        self.name, self.tmp = name, tmp
        self.procs: list[subprocess.Popen[bytes]] = []

    def run(self, cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, "sh", "-c", cmd],
                              capture_output=True, text=True, **kw)  # type: ignore[call-overload]

    def spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(HERE))
        p = subprocess.Popen(["ip", "netns", "exec", self.name, *args], env=env,
                             stdout=open(self.tmp / f"{log}.out", "wb"),
                             stderr=subprocess.STDOUT)
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


def wait_for(cond, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ns]:
    tmp = tmp_path_factory.mktemp("tun")
    pki = tmp / "pki"
    init_pki(pki, ["web", "echo"])
    name = f"ztc{os.getpid()}"
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
        www.mkdir()
        ns.spawn([PY, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(www), str(HTTP)], "http")
        ns.spawn([PY, str(HERE / "sha_sink.py"), str(SINK)], "sink")
        ns.spawn([PY, "-c", "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                  "s.bind(('127.0.0.1',17007))\nwhile 1:\n d,a=s.recvfrom(65535); s.sendto(d,a)"], "udpecho")
        ns.spawn([ZTNA, "intermediate", "--listen", f"127.0.0.1:{INTER}", "--pki", str(pki),
                  "--metrics", "off"], "intermediate")
        time.sleep(1.0)
        ns.spawn([ZTNA, "connector", "--intermediate", f"127.0.0.1:{INTER}", "--server-name", "localhost",
                  "--pki", str(pki), "--p2p-port", str(P2P), "--metrics", f"127.0.0.1:{METRICS}",
                  "--service", f"web=10.100.0.2,fd00:100::2;tcp:80=127.0.0.1:{HTTP};tcp:81=127.0.0.1:{SINK}",
                  "--service", "echo=10.100.0.3;udp:7=127.0.0.1:17007"], "connector")
        wait_for(lambda: '"ok": true' in ns.run(f"curl -s 127.0.0.1:{METRICS}/healthz").stdout,
                 "connector healthz")
        bridge = ns.spawn([PY, str(HERE / "tun_bridge.py"), "127.0.0.1", str(INTER), str(pki),
                           "web=10.100.0.2/32,fd00:100::2/128", "echo=10.100.0.3/32"], "bridge")
        wait_for(lambda: b"READY" in (tmp / "bridge.out").read_bytes(), "TUN bridge")
        assert bridge.poll() is None
        yield ns
    finally:
        for p in ns.procs:
            p.terminate()
        for p in ns.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(["ip", "netns", "del", name])


def make_file(ns: Ns, size: int) -> str:
    path = ns.tmp / "www" / f"f{size}"
    if not path.exists():
        path.write_bytes(os.urandom(size))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def download(ns: Ns, size: int, url_host: str = "10.100.0.2") -> tuple[str, float]:
    want = make_file(ns, size)
    t0 = time.monotonic()
    r = ns.run(f"curl -sS --max-time 600 http://{url_host}/f{size} | sha256sum", timeout=700)
    dt = time.monotonic() - t0
    assert r.stdout.split()[0] == want, r.stderr
    return want, dt


def upload(ns: Ns, size: int) -> float:
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
    env = f"PYTHONPATH={HERE}"
    if mode == "get":
        want = make_file(ns, size)
        r = ns.run(f"{env} {PY} {HERE / 'stream_client.py'} 127.0.0.1 {INTER} {ns.tmp / 'pki'} web "
                   f"10.100.0.2 80 get /f{size}", timeout=700)
        assert f"SHA256 {want}" in r.stdout and "STATUS 0" in r.stdout, r.stdout + r.stderr
    else:
        pattern = (bytes(range(256)) * 256)
        h = hashlib.sha256()
        left = size
        while left:
            h.update(pattern[:min(left, len(pattern))])
            left -= min(left, len(pattern))
        r = ns.run(f"{env} {PY} {HERE / 'stream_client.py'} 127.0.0.1 {INTER} {ns.tmp / 'pki'} web "
                   f"10.100.0.2 81 upload {size}", timeout=700)
        assert f"REPLY {h.hexdigest()} {size}" in r.stdout, r.stdout + r.stderr
    return float(r.stdout.split("SECONDS")[1].split()[0])


def test_tcp_in_datagram_download_upload_and_udp_ping(world: Ns) -> None:
    download(world, 8 << 20)
    upload(world, 8 << 20)
    # UDP echo reply comes back from the virtual address (connect() filters on source)
    r = world.run(f"{PY} -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                  "s.settimeout(3); s.connect(('10.100.0.3',7)); s.send(b'hi'); print(s.recv(99))\"")
    assert "b'hi'" in r.stdout, r.stdout + r.stderr
    assert world.run("ping -c1 -W2 10.100.0.2").returncode == 0
    assert world.run("ping -c1 -W1 10.100.0.9").returncode != 0


def test_streams_download_and_upload(world: Ns) -> None:
    stream(world, "get", 8 << 20)
    stream(world, "upload", 8 << 20)


@pytest.mark.slow
@pytest.mark.parametrize("loss", [0, 3])
def test_100mb_each_way(world: Ns, loss: int) -> None:
    world.loss(loss)
    try:
        size = 100 << 20
        _, d = download(world, size)
        u = upload(world, size)
        sd = stream(world, "get", size)
        su = stream(world, "upload", size)
        print(f"\nloss {loss}%: dgram down {size / d / 1e6:.1f} MB/s ({d:.1f}s) up {size / u / 1e6:.1f} MB/s "
              f"({u:.1f}s); streams down {size / sd / 1e6:.1f} MB/s ({sd:.1f}s) up {size / su / 1e6:.1f} MB/s ({su:.1f}s)")
    finally:
        world.loss(0)
