"""Apps by DNS name in the namespace lab (root): a real dnsmasq on the Connector's side
resolves the private names; the Connector serves `corp=*.corp.test,git.corp.test;tcp:80=:8080`
with `--dns-server`; the Agent (TUN mode) answers DNS with synthetic addresses and carries
the name to the Connector; a second Agent in userspace mode takes `curl --socks5-hostname`.

Checked end to end, byte for byte: curl http://app1.corp.test/ through the TUN (A and AAAA),
a wildcard name two labels deep, the exact name; a name outside the Agent's patterns is
REFUSED by its DNS, and with resolv.conf as docs/agent.md says (the Agent first, the
machine's resolver after it) glibc then gets it from the next nameserver; a name the Agent
covers but the Connector does not is refused by the Connector (the Agent cannot widen what
it may reach); a covered name with no record comes
back as NAME_UNRESOLVED and the Agent logs it; a synthetic address stops working once its
TTL ran out; a full pool answers SERVFAIL until a binding expires."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ztna.certs import init_pki
from ztna.worlds.lab_tun import make_files

PY = sys.executable
DNS = "100.64.0.53"
TTL = 1.0
HOLD = TTL + 2.0 + 0.7          # the pool keeps a binding ttl + 2 s after the last answer

pytestmark = pytest.mark.root

_DIG = r"""
import json, sys
import dns.message, dns.query, dns.rcode
out = []
for arg in sys.argv[2:]:
    name, rdtype = arg.split("/")
    r = dns.query.udp(dns.message.make_query(name, rdtype), sys.argv[1], timeout=3)
    out.append({"name": name, "rcode": dns.rcode.to_text(r.rcode()),
                "addrs": [rr.address for rs in r.answer for rr in rs], "ttl": [rs.ttl for rs in r.answer]})
print(json.dumps(out))
"""


class NamesWorld:
    def __init__(self, lab: Any, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.pki = workdir / "pki"
        self.procs: list[subprocess.Popen[bytes]] = []
        relay = lab.addr("relay", 4)
        self.inter = f"{relay}:4433"
        self.app = lab.addr("app", 4)
        self.resolv = workdir / "resolv.conf"
        # The documented set-up without systemd-resolved: the Agent first, the machine's own
        # resolver (here a dnsmasq in the Agent's namespace) after it.
        self.resolv.write_text(f"nameserver {DNS}\nnameserver 127.0.0.1\noptions timeout:2 attempts:2\n")

    def spawn(self, node: str, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        fh = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        p = self.lab.spawn(node, argv, stdout=fh, stderr=subprocess.STDOUT,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
        fh.close()
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start(self, www: Path) -> None:
        init_pki(self.pki, ["corp"], hosts=["ztna-intermediate"])
        conf = self.workdir / "dnsmasq.conf"
        conf.write_text("\n".join([
            "no-resolv", "no-hosts", "keep-in-foreground", "port=5353", "listen-address=127.0.0.1",
            "bind-interfaces", "user=root", f"pid-file={self.workdir / 'dnsmasq.pid'}", "log-queries",
            "log-facility=-", "local=/corp.test/",
            f"host-record=app1.corp.test,{self.app}", f"host-record=deep.team.corp.test,{self.app}",
            f"host-record=git.corp.test,{self.app}", f"host-record=x.evil.test,{self.app}", ""]))
        self.spawn("conn", [shutil.which("dnsmasq") or "dnsmasq", f"--conf-file={conf}"], "dnsmasq")
        local = self.workdir / "dnsmasq-agent.conf"
        local.write_text("\n".join([
            "no-resolv", "no-hosts", "keep-in-foreground", "port=53", "listen-address=127.0.0.1",
            "bind-interfaces", "user=root", f"pid-file={self.workdir / 'dnsmasq-agent.pid'}",
            "log-facility=-", "host-record=www.outside.test,192.0.2.7", ""]))
        self.spawn("agent", [shutil.which("dnsmasq") or "dnsmasq", f"--conf-file={local}"], "dnsmasq-agent")
        self.spawn("app", [PY, "-m", "http.server", "--bind", "::", "8080", "--directory", str(www)], "http")
        self.spawn("relay", [PY, "-m", "ztna", "intermediate", "--pki", str(self.pki), "--metrics", "off"],
                   "intermediate")
        time.sleep(0.5)
        self.spawn("conn", [PY, "-m", "ztna", "connector", "--intermediate", self.inter,
                            "--server-name", "ztna-intermediate", "--pki", str(self.pki), "--metrics", "off",
                            "--dns-server", "127.0.0.1:5353", "--audit-log", str(self.workdir / "audit.jsonl"),
                            "--service", "corp=*.corp.test,git.corp.test;tcp:80=:8080"], "connector")
        time.sleep(0.5)
        common = ["--intermediate", self.inter, "--server-name", "ztna-intermediate", "--pki", str(self.pki)]
        self.spawn("agent", [PY, "-m", "ztna", "agent", *common, "--mode", "tun",
                             "--service", "corp=*.corp.test,git.corp.test,*.evil.test",
                             "--name", "names", "--tun-name", "ztna0", "--state-dir", str(self.workdir / "s1"),
                             "--dns-ttl", str(TTL), "--dns-pool", "100.80.0.0/29", "--dns-pool", "fd00:80::/64",
                             "--no-dns-configure"], "agent-tun")
        self.spawn("agent", [PY, "-m", "ztna", "agent", *common, "--mode", "userspace",
                             "--service", "corp=*.corp.test", "--socks", "127.0.0.1:1080",
                             "--name", "socks", "--state-dir", str(self.workdir / "s2")], "agent-socks")

    def status(self, name: str) -> dict[str, Any] | None:
        r = self.lab.run("agent", [PY, "-m", "ztna", "status", "--json", "--name", name, "--state-dir",
                                   str(self.workdir / ("s1" if name == "names" else "s2"))], check=False)
        if r.returncode != 0:
            return None
        data = json.loads(r.stdout)
        return data[0] if isinstance(data, list) else data

    def wait_ready(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        snap = None
        while time.monotonic() < deadline:
            for p in self.procs:
                assert p.poll() is None, (p.args, self.log("agent-tun")[-2000:], self.log("connector")[-2000:])
            snap = self.status(name)
            if snap and snap["services"][0]["registration"] == "acked" and (name != "names" or "dns" in snap):
                return snap
            time.sleep(0.2)
        raise AssertionError(f"{name} not ready: {snap}")

    def dig(self, *queries: str) -> list[dict[str, Any]]:
        r = self.lab.run("agent", [PY, "-c", _DIG, DNS, *queries])
        return json.loads(r.stdout)  # type: ignore[no-any-return]

    def resolved(self, *argv: str) -> subprocess.CompletedProcess[str]:
        """`argv` in the agent namespace with resolv.conf as documented (a bind mount in a
        private mount namespace: the host's resolv.conf is untouched)."""
        script = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
        return self.lab.run("agent", ["unshare", "-m", "sh", "-c", script, str(self.resolv), *argv],
                            check=False, timeout=60)

    def curl(self, url: str, *args: str) -> tuple[int, bytes, str]:
        out = self.workdir / "curl.out"
        out.unlink(missing_ok=True)
        r = self.resolved("curl", "-sS", "--max-time", "20", "-o", str(out), *args, url)
        return r.returncode, out.read_bytes() if out.exists() else b"", r.stderr

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def test_apps_by_name_tun_and_socks(lab_factory: Any, tmp_path: Path) -> None:
    if shutil.which("dnsmasq") is None:
        pytest.fail("dnsmasq is not installed (.ci/run installs dnsmasq-base)")
    lab = lab_factory(ip="dual")
    www = tmp_path / "www"
    make_files(www, {"blob": 1024 * 1024 + 7})
    blob = (www / "blob").read_bytes()
    world = NamesWorld(lab, tmp_path)
    try:
        world.start(www)
        world.wait_ready("names")
        world.wait_ready("socks")

        # Through the TUN: A, AAAA, a wildcard two labels deep, the exact name: byte-exact.
        for url, extra in (("http://app1.corp.test/blob", ("-4",)), ("http://app1.corp.test/blob", ("-6",)),
                           ("http://deep.team.corp.test/blob", ()), ("http://git.corp.test/blob", ())):
            rc, body, err = world.curl(url, *extra)
            assert rc == 0 and body == blob, (url, extra, rc, err, world.log("agent-tun")[-1500:])
        a, aaaa = world.dig("app1.corp.test/A", "app1.corp.test/AAAA")
        assert a["rcode"] == "NOERROR" and a["addrs"][0].startswith("100.80.0.") and a["ttl"] == [1]
        assert aaaa["rcode"] == "NOERROR" and aaaa["addrs"][0].startswith("fd00:80::")
        conn_log = world.log("connector")
        assert f"name app1.corp.test:80 -> {world.app}:8080" in conn_log, conn_log[-2000:]
        assert "name deep.team.corp.test:80" in conn_log
        # The audit log records the name with the flow (written by a thread: wait for it).
        audit = tmp_path / "audit.jsonl"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (audit.exists() and "app1.corp.test" in audit.read_text()):
            time.sleep(0.2)
        lines = [json.loads(x) for x in audit.read_text().splitlines() if x]
        named = [x for x in lines if x["name"] == "app1.corp.test"]
        assert named and all(x["bytes_from_service"] > len(blob) and x["dst_port"] == 80 for x in named), lines

        # Outside every pattern of the Agent: REFUSED (the system resolver's next server answers).
        (outside,) = world.dig("www.outside.test/A")
        assert outside["rcode"] == "REFUSED" and not outside["addrs"]
        # ... so the system resolver moves on to its next nameserver, which knows the name.
        r = world.resolved("getent", "ahostsv4", "www.outside.test")
        assert r.returncode == 0 and r.stdout.split()[0] == "192.0.2.7", (r.returncode, r.stdout, r.stderr)
        # Covered by the Agent's pattern but not the Connector's: the Connector refuses.
        rc, body, _ = world.curl("http://x.evil.test/blob")
        assert rc != 0 and body == b""
        assert "x.evil.test is outside the patterns of service corp" in world.log("connector")
        # Covered everywhere, but no such record: NAME_UNRESOLVED, logged by the Agent.
        rc, body, _ = world.curl("http://nope.corp.test/blob")
        assert rc != 0 and body == b""
        assert "NAME_UNRESOLVED" in world.log("agent-tun")
        assert "name nope.corp.test:80: cannot resolve" in world.log("connector")

        # TTL expiry: once the binding is gone, the address leads nowhere.
        time.sleep(HOLD)
        (fresh,) = world.dig("app1.corp.test/A")
        ip = fresh["addrs"][0]
        rc, body, _ = world.curl(f"http://{ip}/blob")
        assert rc == 0 and body == blob                       # bound: works by address too
        time.sleep(HOLD)
        rc, body, _ = world.curl(f"http://{ip}/blob")
        assert rc != 0 and body == b""
        snap = world.status("names")
        assert snap is not None and snap["tcp_redirect"]["name_expired"] >= 1

        # Exhaustion: a /29 holds six names; the seventh gets SERVFAIL until one expires.
        time.sleep(HOLD)
        answers = world.dig(*[f"n{i}.corp.test/A" for i in range(7)])
        assert [x["rcode"] for x in answers] == ["NOERROR"] * 6 + ["SERVFAIL"]
        assert len({x["addrs"][0] for x in answers[:6]}) == 6
        time.sleep(HOLD)
        (late,) = world.dig("n6.corp.test/A")
        assert late["rcode"] == "NOERROR"
        snap = world.status("names")
        assert snap is not None and snap["dns"]["servfail_exhausted"] == 1

        # Userspace mode: SOCKS5 with the name; a name outside every service is a SOCKS error.
        r = lab.run("agent", ["curl", "-sS", "--max-time", "20", "--socks5-hostname", "127.0.0.1:1080",
                              "-o", str(tmp_path / "socks.out"), "http://app1.corp.test/blob"], check=False)
        assert r.returncode == 0 and (tmp_path / "socks.out").read_bytes() == blob, r.stderr
        r = lab.run("agent", ["curl", "-sS", "--max-time", "20", "--socks5-hostname", "127.0.0.1:1080",
                              "http://www.example.org/"], check=False)
        assert r.returncode == 97, (r.returncode, r.stderr)     # curl: SOCKS proxy refused
        assert "www.example.org is not a service" in world.log("agent-socks")
    finally:
        world.close()
