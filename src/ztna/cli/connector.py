"""`ztna connector`: run an App Connector (config file and/or flags; docs/connector.md)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import click

from ztna.errors import UsageError


@click.command(name="connector")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--intermediate", help="Intermediate HOST[:PORT] (port defaults to 4433; IPv6 in brackets);"
                                    " several, comma-separated, for members of one cluster: attach to"
                                    " the first, fail over to the next.")
@click.option("--attach", type=click.Choice(["one", "all"]),
              help="With several --intermediate: 'one' (default) attaches to the first and fails over to"
                   " the next; 'all' stays attached to every one at once, so the services survive the"
                   " loss of any of them without a reconnect.")
@click.option("--server-name", help="TLS name to verify on the Intermediate (default: its host).")
@click.option("--name", help="This Connector's name among those sharing its certificate (default: the host name); "
              "a restart under the same name replaces its old registration at once.")
@click.option("--pki", type=click.Path(file_okay=False), help="Directory with connector.pem, connector.key, ca.pem.")
@click.option("--cert", type=click.Path(dir_okay=False))
@click.option("--key", type=click.Path(dir_okay=False))
@click.option("--ca", type=click.Path(dir_okay=False))
@click.option("--service", "services", multiple=True,
              help="ID=VIP[,VIP];tcp:PORT=HOST:PORT;udp:PORT=HOST:PORT[;icmp=off][;check=CHECK] (repeatable); "
              "CHECK: none, tcp (default), http:PORT[/PATH][=STATUS] or udp:PORT:PAYLOADHEX=REPLYHEX; "
              "by DNS name: ID=*.corp.test,git.corp.test;tcp:80;tcp:443=:8443.")
@click.option("--dns-server", help="Resolve the names of DNS-pattern services with this server, IP[:PORT] "
              "(default: the system resolver).")
@click.option("--p2p-port", type=str, help="P2P QUIC server port (default 4434, 0 = ephemeral, off = none).")
@click.option("--relay-port", type=int, help="Local port of the relay socket (default 0 = ephemeral).")
@click.option("--metrics", help="Metrics HOST:PORT (default 127.0.0.1:9091) or 'off'.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--revoked", type=click.Path(dir_okay=False),
              help="Deny-list of certificate serials and identities for direct (P2P) connections"
                   " (docs/admin.md); reloaded on SIGHUP.")
@click.option("--audit-log", type=click.Path(dir_okay=False),
              help="Write one JSON line per flow (when it ends, and every --audit-interval for long flows) to FILE.")
@click.option("--audit-log-max-bytes", type=int, help="Rotate the audit log at this size (default 10 MiB).")
@click.option("--audit-log-backups", type=int, help="Rotated audit logs kept (default 5).")
@click.option("--audit-interval", type=float, help="Minutes between interim lines of a long flow (default 5).")
@click.option("--no-flow-control", is_flag=True, hidden=True, help="Benchmarks only.")
def connector(config_path: str | None, intermediate: str | None, attach: str | None, server_name: str | None,
              name: str | None, pki: str | None, cert: str | None, key: str | None, ca: str | None,
              services: tuple[str, ...], dns_server: str | None, p2p_port: str | None, relay_port: int | None,
              metrics: str | None, log_level: str | None, revoked: str | None,
              audit_log: str | None, audit_log_max_bytes: int | None, audit_log_backups: int | None,
              audit_interval: float | None, no_flow_control: bool) -> None:
    """Run an App Connector next to private apps: serves each service's virtual IPs and
    ports from its own backend, through the Intermediate relay and direct P2P QUIC."""
    from ztna.connector.config import load_config

    overrides: dict[str, object] = {"intermediate": intermediate, "attach": attach,
                                    "server_name": server_name, "name": name,
                                    "relay_port": relay_port, "metrics": metrics,
                                    "log_level": log_level, "audit_log": audit_log,
                                    "audit_log_max_bytes": audit_log_max_bytes,
                                    "audit_log_backups": audit_log_backups,
                                    "audit_interval_minutes": audit_interval,
                                    "revoked": Path(revoked) if revoked is not None else None,
                                    "dns_server": dns_server}
    if pki is not None:
        d = Path(pki)
        overrides.update(cert=d / "connector.pem", key=d / "connector.key", ca=d / "ca.pem")
    for name, value in (("cert", cert), ("key", key), ("ca", ca)):
        if value is not None:
            overrides[name] = Path(value)
    if p2p_port is not None:
        if p2p_port.lower() == "off":
            overrides["p2p_port"] = None
            overrides["_p2p_off"] = True
        else:
            overrides["p2p_port"] = p2p_port
    p2p_off = overrides.pop("_p2p_off", False)
    try:
        cfg = load_config(config_path, overrides, list(services))
        if p2p_off:
            cfg = cfg.model_copy(update={"p2p_port": None})
        if no_flow_control:
            cfg = cfg.model_copy(update={"limits": cfg.limits.model_copy(update={"flow_control": False})})
    except UsageError as exc:
        click.echo(f"ztna connector: config error: {exc}", err=True)
        sys.exit(2)
    from ztna.startup import check_tls_files

    try:
        check_tls_files(cfg.cert, cfg.key, cfg.ca)
    except UsageError as exc:
        click.echo(f"ztna connector: {exc}", err=True)
        sys.exit(2)
    if cfg.revoked is not None:
        from ztna.revocation import load_revocations

        try:
            load_revocations(cfg.revoked)
        except UsageError as exc:
            click.echo(f"ztna connector: {exc}", err=True)
            sys.exit(2)
    from ztna.connector.service import Connector
    from ztna.observe import setup_logging

    setup_logging(cfg.log_level)
    try:
        asyncio.run(Connector(cfg).run_forever())
    except UsageError as exc:   # e.g. a port that cannot be bound
        click.echo(f"ztna connector: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"ztna connector: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
