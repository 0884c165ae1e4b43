"""`ztna agent`: run the Agent (TUN split tunnel as root, userspace forwards otherwise).

    ztna agent --intermediate relay.example.com:4433 --pki ./pki --service web=10.100.0.2
    ztna agent --config /etc/ztna/agent.toml --log-level debug

Flags override the TOML file (`ztna.agent.config.load_agent_file`). Exit codes: 0 after
SIGINT/SIGTERM, 2 for a bad configuration (a bad flag or file, an unreadable or mismatched
certificate/key/CA, a port that cannot be bound, another Agent with the same name).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from ztna.errors import UsageError

if TYPE_CHECKING:
    from ztna.agent.config import AgentOptions


def _build_options(**kw: Any) -> AgentOptions:  # (the import is lazy for --help speed)
    from pydantic import ValidationError

    from ztna.agent.config import AgentOptions, parse_forward, parse_service, split_host_port
    from ztna.quic.config import TlsFiles
    from ztna.startup import check_tls_files_apart

    if not kw["intermediate"]:
        raise UsageError("no Intermediate: give --intermediate HOST:PORT (or `intermediate` in"
                         " the --config file)")
    if not kw["service"]:
        raise UsageError("no service: give --service ID=IP[,IP] (or `services` in the --config"
                         " file)")
    if kw["pki"]:
        tls = TlsFiles.from_dir(kw["pki"], "agent")
    elif kw["cert"] and kw["key"] and kw["ca"]:
        tls = TlsFiles(Path(kw["cert"]), Path(kw["key"]), Path(kw["ca"]))
    else:
        raise UsageError("give --pki DIR or all of --cert, --key and --ca")
    check_tls_files_apart(tls.cert, tls.key, tls.ca)
    targets = tuple(split_host_port(t.strip(), default_port=4433)
                    for t in str(kw["intermediate"]).split(",") if t.strip())
    if not targets:
        raise UsageError("no Intermediate: give --intermediate HOST:PORT[,HOST:PORT…]")
    host, port = targets[0]
    mode = kw["mode"] or ("tun" if os.geteuid() == 0 else "userspace")
    values: dict[str, Any] = dict(
        intermediate=(host, port), intermediates=targets if len(targets) > 1 else (), tls=tls,
        pick=kw["pick"] or "rtt",
        server_name=kw["server_name"] or None,
        services=tuple(parse_service(s) for s in kw["service"]),
        mode=mode, tun_name=kw["tun_name"], name=kw["name"] or kw["tun_name"],
        forwards=tuple(parse_forward(f, "-L") for f in kw["forward"]),
        udp_forwards=tuple(parse_forward(f, "-U") for f in kw["udp_forward"]),
        socks=split_host_port(str(kw["socks"]), default_port=1080) if kw["socks"] else None,
        tcp_transport=kw["tcp_transport"],
        p2p_cooldown=kw["p2p_cooldown"],
        dns_ttl=kw["dns_ttl"],
        dns_configure=not kw["no_dns_configure"],
    )
    if kw["dns_pool"]:
        import ipaddress

        try:
            values["dns_pools"] = tuple(ipaddress.ip_network(p.strip(), strict=True) for p in kw["dns_pool"])
        except ValueError as exc:
            raise UsageError(f"--dns-pool: {exc}") from None
    if kw["dns_listen"]:
        import ipaddress

        try:
            values["dns_listen"] = ipaddress.IPv4Address(str(kw["dns_listen"]))
        except ValueError as exc:
            raise UsageError(f"--dns-listen: {exc} (an IPv4 address)") from None
    if kw["metrics"] and kw["metrics"] != "off":
        values["metrics"] = split_host_port(str(kw["metrics"]), default_port=9092)
    if kw["state_dir"]:
        values["state_dir"] = Path(kw["state_dir"])
    try:
        return AgentOptions(**values)
    except ValidationError as exc:
        raise UsageError("; ".join(e["msg"].removeprefix("Value error, ")
                                   for e in exc.errors())) from None


def _merge_config(ctx: click.Context, config_path: Path | None, kw: dict[str, object]) -> None:
    """Fill `kw` (the flags) from the TOML file where a flag was not given on the command
    line: a flag always beats the file, the file beats the defaults."""
    if config_path is None:
        return
    from ztna.agent.config import load_agent_file

    for name, value in load_agent_file(config_path).items():
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            kw[name] = value


@click.command(name="agent")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (flags override it; see docs/agent.md).")
@click.option("--intermediate", metavar="HOST:PORT[,HOST:PORT…]",
              help="The Intermediate (port defaults to 4433); several, comma-separated, for members"
                   " of one cluster: attach to the one --pick says, fail over to the next.")
@click.option("--pick", type=click.Choice(["rtt", "first"]),
              help="Of several Intermediates, attach first to: 'rtt' (default) the nearest by a timed"
                   " handshake with each (the list's order among those within 20 ms or 1.5x of the"
                   " nearest), or 'first' the first in the list.")
@click.option("--pki", type=click.Path(file_okay=False), help="Directory with agent.pem, agent.key, ca.pem.")
@click.option("--cert", type=click.Path(dir_okay=False))
@click.option("--key", type=click.Path(dir_okay=False))
@click.option("--ca", type=click.Path(dir_okay=False))
@click.option("--server-name", help="TLS name to verify on the Intermediate (default: its host, a DNS name or an IP).")
@click.option("--service", "service", multiple=True, metavar="ID=IP|PATTERN[,...]",
              help="A service and its virtual IPs and/or DNS patterns, e.g. web=10.100.0.2,fd00:100::2 or "
                   "corp=*.corp.test,git.corp.test (repeatable; required here or in --config).")
@click.option("--mode", type=click.Choice(["tun", "userspace"]), help="Default: tun as root, else userspace.")
@click.option("--tun-name", default="ztna0", show_default=True)
@click.option("--name", help="Agent name (state file and status socket); default: the TUN name.")
@click.option("-L", "--forward", multiple=True, metavar="[HOST:]PORT=SERVICE:PORT",
              help="Local TCP forward (SERVICE: an id, a virtual IP, or a name a service's DNS patterns cover).")
@click.option("-U", "--udp-forward", multiple=True, metavar="[HOST:]PORT=SERVICE:PORT", help="Local UDP forward.")
@click.option("--socks", metavar="HOST:PORT", help="SOCKS5 server (CONNECT, UDP ASSOCIATE).")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Default /run/ztna-agent (root).")
@click.option("--tcp-transport", type=click.Choice(["datagram", "stream"]), default="stream", show_default=True,
              help="TUN mode TCP carriage: 'datagram' (TCP packets in DATAGRAMs, end-to-end TCP) "
                   "or 'stream' (local kernel terminates TCP, nftables redirect, one QUIC stream "
                   "per connection).")
@click.option("--p2p-cooldown", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds on the relay after a direct-path failure before punching again.")
@click.option("--metrics", metavar="HOST:PORT|off", default="off", show_default=True,
              help="Prometheus /metrics (direct-path warm-up histograms) and /healthz.")
@click.option("--dns-ttl", type=click.FloatRange(min=0.1, max=86400), default=30.0, show_default=True,
              help="TUN mode, DNS-pattern services: TTL of the synthetic A/AAAA answers (and how long "
                   "an address stays bound to its name after the last answer, plus 2 s).")
@click.option("--dns-pool", multiple=True, metavar="CIDR",
              help="Synthetic address pools for names (one IPv4, one IPv6; default 100.80.0.0/16 and "
                   "fd00:80::/64).")
@click.option("--dns-listen", metavar="IPV4", help="Address of the Agent's DNS responder, put on the TUN "
              "(default 100.64.0.53).")
@click.option("--no-dns-configure", is_flag=True,
              help="Do not point systemd-resolved at the responder for the services' domains.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.pass_context
def agent(ctx: click.Context, config_path: Path | None, **kw: Any) -> None:
    """Run the Agent until SIGINT/SIGTERM."""
    from ztna.observe import setup_logging

    try:
        _merge_config(ctx, config_path, kw)
        setup_logging(str(kw.pop("log_level")))
        options = _build_options(**kw)
        from ztna.agent.agent import Agent

        asyncio.run(Agent(options).run_forever())
    except UsageError as exc:
        # One line and status 2, like click's own usage errors and the other two programs.
        click.echo(f"ztna agent: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        pass
