"""The comparison rows: baselines, wireguard-go, nebula (direct and relayed) and sshuttle.

Each ``run_*`` sets its tunnel up inside one ``RowScope`` (so everything is torn down
after the row, whatever happens), waits until the app's echo answers through it, then
calls ``ctx.measure``. Set-ups follow the shared netlab notes (§5), which were measured
through the same two NATs:

* wireguard-go: static endpoints on both sides (the cone NATs preserve ports and both
  sides send at once), split route ``10.2.0.0/24`` on the agent, forwarding + masquerade
  on the connector node so the app needs no route back.
* nebula 1.6.1: lighthouse + relay on the relay node, hosts on agent and conn, the app
  LAN through ``unsafe_routes`` via the conn host (cert signed with ``-subnets``). The
  relayed row blocks the direct path at NAT B before nebula starts, so it must relay.
* sshuttle 1.1.1 (``--method nft``) to an sshd on the conn node, reached through a
  DNAT port forward on NAT B (sshuttle needs a reachable SSH server); TCP only.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time

from ztna.bench.harness import (
    APP_IPERF_PORT,
    APP_TCP_ECHO,
    APP_UDP_ECHO,
    APT_LINE,
    BenchContext,
    Row,
    RowError,
    RowScope,
    missing_tools,
    wait_echo,
)
from ztna.bench.lanops import NAT_A_PUB, NAT_B_PUB, RELAY_PUB, block_direct, port_forward

APP = "10.2.0.20"
APP_LAN = "10.2.0.0/24"


def _missing(row: Row, *tools: str) -> bool:
    gone = missing_tools(*tools)
    if gone:
        row.status = "missing"
        row.note = f"not installed: {', '.join(gone)} ({APT_LINE})"
    return bool(gone)


def _forward_and_masquerade(scope: RowScope, src: str, table: str) -> None:
    """On the conn node: route tunnel traffic onto the LAN, hiding the tunnel source."""
    lab = scope.lab
    lab.run("conn", ["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    scope.on_close("ip_forward", lambda: lab.run(
        "conn", ["sysctl", "-qw", "net.ipv4.ip_forward=0"], check=False))
    scope.nft("conn", "\n".join([
        f"table ip {table} {{", "  chain post {",
        "    type nat hook postrouting priority srcnat;",
        f'    oifname "eth0" ip saddr {src} masquerade', "  }", "}"]) + "\n", f"ip {table}")


# ---------------------------------------------------------------------- baselines
def run_lan_baseline(ctx: BenchContext, row: Row) -> None:
    """conn -> app on their shared LAN: what the connector's own network can do."""
    if _missing(row, "iperf3"):
        return
    with ctx.scope(row.key) as scope:
        ctx.measure(scope, row, target=APP, udp=True, client="conn", audit=False)


def run_underlay(ctx: BenchContext, row: Row) -> None:
    """agent -> app with no tunnel: a port forward on NAT B, the same wires as direct P2P."""
    if _missing(row, "iperf3"):
        return
    with ctx.scope(row.key) as scope:
        port_forward(scope, "benchfwd", [("tcp", 15201, f"{APP}:{APP_IPERF_PORT}"),
                                         ("tcp", 17000, f"{APP}:{APP_TCP_ECHO}"),
                                         ("udp", 10007, f"{APP}:{APP_UDP_ECHO}")])
        ctx.measure(scope, row, target=NAT_B_PUB, udp=True, iperf_port=15201,
                    iperf_server_port=APP_IPERF_PORT, tcp_echo=17000, udp_echo=10007)


# ---------------------------------------------------------------------- wireguard-go
def _wg_keys(workdir: str, name: str) -> str:
    key = os.path.join(workdir, f"{name}.key")
    priv = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(priv)
    return subprocess.run(["wg", "pubkey"], input=priv, capture_output=True, text=True,
                          check=True).stdout.strip()


def run_wireguard(ctx: BenchContext, row: Row) -> None:
    if _missing(row, "wireguard-go", "wg", "iperf3"):
        return
    lab = ctx.lab
    ifs = {"agent": f"{lab.config.prefix}wga", "conn": f"{lab.config.prefix}wgc"}
    with ctx.scope(row.key) as scope:
        t0 = time.monotonic()
        pubs = {n: _wg_keys(scope.workdir, n) for n in ifs}
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
        for node, ifname in ifs.items():
            proc = scope.spawn(node, ["wireguard-go", "-f", ifname], f"wg-{node}", env=env)
            sock = f"/var/run/wireguard/{ifname}.sock"
            scope.wait_for(f"wireguard-go {node}", functools.partial(os.path.exists, sock), 10,
                           proc, f"wg-{node}")
        plan = {"agent": ("conn", NAT_B_PUB, "100.100.0.1", f"100.100.0.2/32,{APP_LAN}"),
                "conn": ("agent", NAT_A_PUB, "100.100.0.2", "100.100.0.1/32")}
        for node, (peer, endpoint, addr, allowed) in plan.items():
            ifname = ifs[node]
            lab.run(node, ["wg", "set", ifname, "private-key",
                           os.path.join(scope.workdir, f"{node}.key"), "listen-port", "51820",
                           "peer", pubs[peer], "endpoint", f"{endpoint}:51820",
                           "allowed-ips", allowed, "persistent-keepalive", "5"])
            lab.run(node, ["ip", "addr", "add", f"{addr}/24", "dev", ifname])
            lab.run(node, ["ip", "link", "set", ifname, "up"])
        lab.run("agent", ["ip", "route", "add", APP_LAN, "dev", ifs["agent"]])
        _forward_and_masquerade(scope, "100.100.0.0/24", "benchwg")
        row.extra["ready_s"] = wait_echo(lab, "agent", APP, APP_UDP_ECHO, None, 20)
        row.setup_s = round(time.monotonic() - t0, 3)
        row.extra["version"] = _version(["wireguard-go", "--version"])
        ctx.measure(scope, row, target=APP, udp=True)


def _version(argv: list[str]) -> str | None:
    from ztna.bench.harness import tool_version

    return tool_version(argv)


# ---------------------------------------------------------------------- nebula
def _nebula_certs(workdir: str) -> None:
    def cert(*args: str) -> None:
        subprocess.run(["nebula-cert", *args], cwd=workdir, check=True, capture_output=True,
                       timeout=30)

    cert("ca", "-name", "ztna-bench-ca", "-duration", "2h")
    cert("sign", "-name", "lh", "-ip", "100.65.0.1/24")
    cert("sign", "-name", "agent", "-ip", "100.65.0.2/24")
    cert("sign", "-name", "conn", "-ip", "100.65.0.3/24", "-subnets", APP_LAN)


def _nebula_yaml(workdir: str, host: str, dev: str) -> str:
    lh = host == "lh"
    route = (f', unsafe_routes: [{{route: {APP_LAN}, via: 100.65.0.3}}]'
             if host == "agent" else "")
    text = "\n".join([
        f"pki: {{ca: {workdir}/ca.crt, cert: {workdir}/{host}.crt, key: {workdir}/{host}.key}}",
        f'static_host_map: {{"100.65.0.1": ["{RELAY_PUB}:4242"]}}',
        f"lighthouse: {{am_lighthouse: {str(lh).lower()}, interval: 10, "
        f"hosts: {'[]' if lh else '[100.65.0.1]'}}}",
        'listen: {host: "0.0.0.0", port: 4242}',
        "punchy: {punch: true, respond: true, delay: 1s}",
        f"relay: {{am_relay: {str(lh).lower()}, use_relays: {str(not lh).lower()}, "
        f"relays: {'[]' if lh else '[100.65.0.1]'}}}",
        f"tun: {{dev: {dev}, mtu: 1300{route}}}",
        "logging: {level: info}",
        "firewall:",
        "  outbound: [{port: any, proto: any, host: any}]",
        "  inbound: [{port: any, proto: any, host: any}]",
    ]) + "\n"
    path = os.path.join(workdir, f"{host}.yml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _nebula_direct_up(scope: RowScope) -> bool:
    """NAT A holds a replied UDP flow agent:4242 <-> NAT B:4242 (the punched path)."""
    out = scope.lab.run("nata", ["conntrack", "-L", "-p", "udp", "--orig-dst", NAT_B_PUB],
                        check=False)
    return any("UNREPLIED" not in line and "dport=4242" in line
               for line in out.stdout.splitlines())


def run_nebula(ctx: BenchContext, row: Row, *, relay: bool) -> None:
    if _missing(row, "nebula", "nebula-cert", "iperf3"):
        return
    lab = ctx.lab
    with ctx.scope(row.key) as scope:
        t0 = time.monotonic()
        if relay:
            block_direct(scope)
        _nebula_certs(scope.workdir)
        dev = f"{lab.config.prefix}neb"
        for node, host in (("relay", "lh"), ("agent", "agent"), ("conn", "conn")):
            cfg = _nebula_yaml(scope.workdir, host, dev)
            scope.spawn(node, ["nebula", "-config", cfg], f"nebula-{host}")
            if node == "relay":
                time.sleep(0.5)
        _forward_and_masquerade(scope, "100.65.0.0/24", "benchneb")
        row.extra["ready_s"] = wait_echo(lab, "agent", APP, APP_UDP_ECHO, None, 30)
        if not relay:
            try:  # the first packets may have gone via the relay (nebula upgrades later)
                scope.wait_for("nebula direct path", lambda: _nebula_direct_up(scope), 25)
            except RowError as exc:
                row.errors.append(str(exc))
        row.setup_s = round(time.monotonic() - t0, 3)
        row.extra["version"] = _version(["nebula", "-version"])
        ctx.measure(scope, row, target=APP, udp=True)
        want = "relay" if relay else "direct"
        seen = row.extra.get("path_seen")
        if seen != want:
            row.note = "; ".join(filter(None, [row.note, f"underlay path was {seen}, not {want}"]))


# ---------------------------------------------------------------------- sshuttle
SSHD_CONFIG = """\
Port 22
ListenAddress 0.0.0.0
HostKey {wd}/host_key
PidFile {wd}/sshd.pid
AuthorizedKeysFile {wd}/authorized_keys
PermitRootLogin yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
"""


def run_sshuttle(ctx: BenchContext, row: Row) -> None:
    sshd_bin = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd")
                                         else None)
    if sshd_bin is None:
        row.status = "missing"
        row.note = f"not installed: sshd ({APT_LINE})"
        return
    if _missing(row, "sshuttle", "ssh", "ssh-keygen", "iperf3"):
        return
    lab = ctx.lab
    with ctx.scope(row.key) as scope:
        t0 = time.monotonic()
        wd = scope.workdir
        for name in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                            os.path.join(wd, name)], check=True, capture_output=True,
                           timeout=30)
        with open(os.path.join(wd, "client_key.pub")) as src, \
                open(os.path.join(wd, "authorized_keys"), "w") as dst:
            dst.write(src.read())
        with open(os.path.join(wd, "sshd_config"), "w") as f:
            f.write(SSHD_CONFIG.format(wd=wd))
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        sshd = scope.spawn("conn", [sshd_bin, "-D", "-e", "-f",
                                    os.path.join(wd, "sshd_config")], "sshd")
        port_forward(scope, "benchssh", [("tcp", 2222, "10.2.0.10:22")])
        ssh_cmd = (f"ssh -i {wd}/client_key -o StrictHostKeyChecking=no "
                   "-o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR")
        client = scope.spawn("agent", ["sshuttle", "--method", "nft", "-e", ssh_cmd,
                                       "--python", "python3",
                                       *([] if lab.config.v6 else ["--disable-ipv6"]), "-r",
                                       f"root@{NAT_B_PUB}:2222", APP_LAN], "sshuttle")
        scope.on_close("sshuttle nft tables", lambda: _drop_sshuttle_tables(scope))
        try:
            row.extra["ready_s"] = wait_echo(lab, "agent", APP, None, APP_TCP_ECHO, 30)
        except RowError as exc:
            for proc, name in ((client, "sshuttle"), (sshd, "sshd")):
                if proc.poll() is not None:
                    raise RowError(f"{name} exited: {scope.log_tail(name)}") from exc
            raise RowError(f"{exc}; sshuttle log: {scope.log_tail('sshuttle')}") from exc
        row.setup_s = round(time.monotonic() - t0, 3)
        row.extra["version"] = _version(["sshuttle", "--version"])
        row.note = "TCP only (sshuttle carries no UDP with --method nft)"
        ctx.measure(scope, row, target=APP, udp=False)


def _drop_sshuttle_tables(scope: RowScope) -> None:
    out = scope.lab.run("agent", ["nft", "list", "tables"], check=False)
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2].startswith("sshuttle"):
            scope.lab.run("agent", ["nft", "delete", "table", parts[1], parts[2]], check=False)

