"""`ztna intermediate`: run the public QUIC relay.

    ztna intermediate --pki ./pki                          # [::]:4433, metrics 127.0.0.1:9090
    ztna intermediate --config /etc/ztna/intermediate.toml --listen 0.0.0.0:4433

Flags override the TOML file (`ztna.intermediate.config`). Exit codes: 0 after a graceful
drain (SIGTERM/SIGINT), 2 for a bad configuration (a bad flag or file, an unreadable or
mismatched certificate/key/CA, an address that cannot be bound), 1 for any other failure
to start. SIGHUP reloads the certificate files and the `--revoked` list (closing the live
connections it now revokes).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ztna.errors import UsageError

log = logging.getLogger("ztna.intermediate")

_WARN = "\n" + "!" * 78 + "\n"


def read_token(path: Path) -> bytes:
    """The admin token: the file's first line, at least 16 characters."""
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read admin token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    token = text.strip().splitlines()[0].strip() if text.strip() else ""
    if len(token) < 16:
        raise UsageError(f"admin token file {path}: the token must be at least 16 characters")
    return token.encode()


@click.command(name="intermediate")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file (flags override it).")
@click.option("--listen", multiple=True, metavar="HOST:PORT",
              help="UDP listen address (repeatable). Default [::]:4433, dual-stack.")
@click.option("--pki", type=click.Path(file_okay=False, path_type=Path),
              help="Directory from `ztna certs init` (intermediate.pem/.key, ca.pem).")
@click.option("--cert", type=click.Path(dir_okay=False, path_type=Path), help="Server certificate (PEM).")
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="Server private key (PEM).")
@click.option("--ca", type=click.Path(dir_okay=False, path_type=Path),
              help="CA that client certificates must chain to (PEM).")
@click.option("--metrics", metavar="HOST:PORT|off", help="Prometheus /metrics and /healthz (default 127.0.0.1:9090).")
@click.option("--no-retry", is_flag=True, help="Disable QUIC Retry (address validation).")
@click.option("--insecure-no-client-auth", is_flag=True,
              help="INSECURE: do not check client certificates; anyone may register anything.")
@click.option("--insecure-allow-unscoped-certs", is_flag=True,
              help="INSECURE: accept certificates without ztna service SANs (they may register anything).")
@click.option("--max-connections", type=int, help="Refuse new connections beyond this many.")
@click.option("--handshakes-per-second", type=float, help="Handshakes admitted per source IP per second.")
@click.option("--max-registrations", type=int, help="Registrations allowed per connection.")
@click.option("--udp-payload", type=int, help="QUIC UDP payload size (1200..1452, default 1350).")
@click.option("--keylog", type=click.Path(dir_okay=False, path_type=Path),
              help="Append TLS secrets to FILE (SSLKEYLOGFILE format, for Wireshark).")
@click.option("--qlog", type=click.Path(file_okay=False, path_type=Path), help="Write qlog traces to DIR.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep session tickets (single-use strike register for 0-RTT) and the address-token"
                   " key here, so returning clients resume with 0-RTT even after a restart. Several"
                   " Intermediates sharing this directory share the strike register. Default: memory only.")
@click.option("--no-0rtt", "no_0rtt", is_flag=True, help="Issue no session tickets (no resumption, no 0-RTT).")
@click.option("--cluster", metavar="redis://HOST:PORT/DB",
              help="Join a cluster of Intermediates sharing this Redis (rediss:// for TLS): shared"
                   " address-token and stateless-reset keys and one single-use ticket register, so"
                   " clients resume in 0-RTT on any member. Needs --advertise. Default: standalone.")
@click.option("--advertise", metavar="HOST:PORT",
              help="This member's address as the other members reach it (its name in the cluster).")
@click.option("--revoked", type=click.Path(dir_okay=False, path_type=Path),
              help="Deny-list of certificate serials, identities and fingerprints (docs/admin.md);"
                   " reloaded on SIGHUP, revoked peers' connections are closed at once.")
@click.option("--admin", metavar="HOST:PORT|off",
              help="Serve the admin API and live dashboard here (default off). Loopback needs no"
                   " token for reads; any other address needs --admin-token-file.")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the admin bearer token: enables the write operations (drain,"
                   " disconnect) and is required for a non-loopback --admin.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), help="Default info.")
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path),
              help="Write one JSON line per relayed TCP stream (when it ends, and every --audit-interval"
                   " for long ones) to FILE.")
@click.option("--audit-log-max-bytes", type=int, help="Rotate the audit log at this size (default 10 MiB).")
@click.option("--audit-log-backups", type=int, help="Rotated audit logs kept (default 5).")
@click.option("--audit-interval", type=float, help="Minutes between interim lines of a long flow (default 5).")
@click.pass_context
def intermediate(ctx: click.Context, config_path: Path | None, **flags: Any) -> None:
    """Run the public QUIC relay (Intermediate)."""
    from ztna.intermediate.config import ConfigError, format_host_port, load_config

    overrides: dict[str, Any] = {}
    for name, value in flags.items():
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        if name == "no_retry":
            overrides["retry"] = not value
        elif name == "no_0rtt":
            overrides["zero_rtt"] = not value
        else:
            overrides[name] = value
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        click.echo(f"ztna intermediate: {exc}", err=True)
        sys.exit(2)

    from ztna.observe import setup_logging

    setup_logging(cfg.log_level)
    cert, key, ca = cfg.tls_paths()
    from ztna.startup import check_tls_files

    try:
        check_tls_files(cert, key, ca)
    except UsageError as exc:
        click.echo(f"ztna intermediate: {exc}", err=True)
        sys.exit(2)
    if cfg.insecure_no_client_auth:
        click.echo(f"{_WARN}WARNING: --insecure-no-client-auth: client certificates are NOT checked;"
                   f"\nanyone who can reach this port may register as any Agent or Connector.{_WARN}",
                   err=True)
    if cfg.insecure_allow_unscoped_certs:
        click.echo(f"{_WARN}WARNING: --insecure-allow-unscoped-certs: certificates without ztna service"
                   f"\nSANs are accepted and may register ANY service.{_WARN}", err=True)

    from ztna.intermediate.server import Intermediate, IntermediateOptions
    from ztna.quic.config import TlsFiles
    from ztna.revocation import RevocationFileError, load_revocations

    if cfg.revoked is not None:
        try:
            load_revocations(cfg.revoked)
        except RevocationFileError as exc:
            click.echo(f"ztna intermediate: {exc}", err=True)
            sys.exit(2)
    admin_token = None
    if cfg.admin_token_file is not None:
        try:
            admin_token = read_token(cfg.admin_token_file)
        except UsageError as exc:
            click.echo(f"ztna intermediate: {exc}", err=True)
            sys.exit(2)

    qlog_dir = None
    if cfg.qlog is not None:
        cfg.qlog.mkdir(parents=True, exist_ok=True)
        qlog_dir = str(cfg.qlog)
    options = IntermediateOptions(
        tls=TlsFiles(cert=cert, key=key, ca=ca),
        listen=cfg.listen_addresses(),
        metrics=cfg.metrics_address(),
        retry=cfg.retry,
        insecure_no_client_auth=cfg.insecure_no_client_auth,
        insecure_allow_unscoped=cfg.insecure_allow_unscoped_certs,
        udp_payload=cfg.udp_payload,
        max_connections=cfg.max_connections,
        handshakes_per_source_per_second=cfg.handshakes_per_second,
        max_registrations=cfg.max_registrations,
        keylog=str(cfg.keylog) if cfg.keylog else None,
        qlog_dir=qlog_dir,
        state_dir=str(cfg.state_dir) if cfg.state_dir else None,
        enable_0rtt=cfg.zero_rtt,
        cluster=cfg.cluster,
        advertise=cfg.advertise,
        revoked=str(cfg.revoked) if cfg.revoked else None,
        admin=cfg.admin_address(),
        admin_token=admin_token,
        audit_log=str(cfg.audit_log) if cfg.audit_log else None,
        audit_log_max_bytes=cfg.audit_log_max_bytes,
        audit_log_backups=cfg.audit_log_backups,
        audit_interval=cfg.audit_interval * 60,
    )
    server = Intermediate(options)

    def announce() -> None:
        addrs = ", ".join(
            format_host_port(host, ep.local_address[1])
            for (host, _), ep in zip(options.listen, server.endpoints, strict=True)
        )
        metrics = (
            f"http://{format_host_port(options.metrics[0], server.metrics_server.port)}/metrics"
            if options.metrics and server.metrics_server else "off"
        )
        auth = ("NONE (insecure)" if cfg.insecure_no_client_auth
                else "mTLS, scoped certs only" if not cfg.insecure_allow_unscoped_certs
                else "mTLS, unscoped certs allowed (insecure)")
        admin = (f"http://{format_host_port(options.admin[0], server.admin_server.port)}/"
                 if options.admin and server.admin_server else "off")
        click.echo(f"ztna intermediate: listening on udp {addrs}; metrics {metrics}; admin {admin}; "
                   f"auth {auth}; retry {'on' if cfg.retry else 'off'}; udp payload {cfg.udp_payload}",
                   err=True)

    async def main() -> None:
        run = asyncio.ensure_future(server.run_forever())
        while not server.ready and not run.done():
            await asyncio.sleep(0.01)
        if server.ready:
            announce()
        await run

    try:
        asyncio.run(main())
    except OSError as exc:
        click.echo(f"ztna intermediate: cannot start: {exc}", err=True)
        sys.exit(1)
    except UsageError as exc:
        click.echo(f"ztna intermediate: {exc}", err=True)
        sys.exit(2)
    except (ValueError, Exception) as exc:  # bad PEM files surface as ValueError etc.
        if isinstance(exc, KeyboardInterrupt):
            raise
        click.echo(f"ztna intermediate: cannot start: {type(exc).__name__}: {exc}", err=True)
        sys.exit(1)
    click.echo("ztna intermediate: stopped", err=True)
