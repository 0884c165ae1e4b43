"""`ztna certs`: make a CA and the mTLS certificates for all three programs (no openssl).

    ztna certs init ./pki --service web --service ssh      # CA + intermediate/agent/connector
    ztna certs issue --ca ./pki --role agent --name alice --service web --out ./pki/alice
    ztna certs show ./pki/agent.pem

The work is done by `ztna.certs` (issuing) and `ztna.identity` (what a server derives from a
certificate); this module only parses options and prints.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click
from cryptography import x509
from rich.console import Console
from rich.table import Table

from ztna import certs as pki
from ztna.errors import UsageError
from ztna.identity import certificate_fingerprint, identity_from_certificate, load_ca_file

_console = Console()

_PURPOSE = {
    "ca": "trust anchor: give ca.pem to every program",
    "ca_key": "CA private key: keep it here, needed by `ztna certs issue`",
    "intermediate": "Intermediate (relay) server certificate",
    "agent": "Agent client certificate",
    "connector": "App Connector certificate (client + P2P server)",
}


def _files_table(written: dict[str, Path]) -> Table:
    table = Table(title="Written", show_lines=False)
    table.add_column("file")
    table.add_column("mode")
    table.add_column("purpose")
    for name, path in written.items():
        purpose = _PURPOSE.get(name) or (
            f"private key for {name.removesuffix('_key')}" if name.endswith("_key") else name
        )
        table.add_row(str(path), oct(path.stat().st_mode & 0o777)[2:], purpose)
    return table


@click.group(name="certs")
def certs() -> None:
    """Create a CA and mTLS certificates (no openssl needed)."""


@certs.command(name="init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--service", "services", multiple=True, required=True, metavar="NAME",
              help="Service id the Agent and Connector are authorised for (repeatable).")
@click.option("--host", "hosts", multiple=True, metavar="NAME_OR_IP",
              help="DNS name or IP of the Intermediate (repeatable; default localhost, "
                   "127.0.0.1, ::1).")
@click.option("--days", default=pki.DEFAULT_DAYS, show_default=True, type=int,
              help="Validity of the issued certificates (the CA gets 10 years).")
@click.option("--force", is_flag=True, help="Replace an existing CA in DIRECTORY.")
def init_cmd(directory: Path, services: tuple[str, ...], hosts: tuple[str, ...], days: int,
             force: bool) -> None:
    """Create a CA and certificates for an Intermediate, an Agent and a Connector."""
    try:
        written = pki.init_pki(directory, list(services), list(hosts), days, force=force)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    _console.print(_files_table(written))
    d = directory
    _console.print(
        "\n[bold]Next:[/bold]\n"
        f"  Intermediate: cert {d}/intermediate.pem  key {d}/intermediate.key  CA {d}/ca.pem\n"
        f"  Connector:    cert {d}/connector.pem  key {d}/connector.key  CA {d}/ca.pem\n"
        f"  Agent:        cert {d}/agent.pem  key {d}/agent.key  CA {d}/ca.pem\n"
        f"  Inspect:      ztna certs show {d}/agent.pem\n"
        f"  Another Agent: ztna certs issue --ca {d} --role agent --name alice "
        f"--service {services[0]} --out {d}/alice",
        highlight=False,
        soft_wrap=True,
    )


@certs.command(name="issue")
@click.option("--ca", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding ca.pem and ca.key (from `ztna certs init`).")
@click.option("--role", required=True, type=click.Choice(pki.ISSUE_ROLES))
@click.option("--name", required=True, help="Common name (CN), e.g. alice or connector-2.")
@click.option("--service", "services", multiple=True, metavar="NAME",
              help="Authorise the role for this service (repeatable).")
@click.option("--wildcard", is_flag=True, help="Authorise the role for every service.")
@click.option("--no-scope", is_flag=True,
              help="No ztna SAN at all (servers refuse its registrations; for testing).")
@click.option("--host", "hosts", multiple=True, metavar="NAME_OR_IP",
              help="DNS/IP SAN (intermediate and connector roles).")
@click.option("--days", default=pki.DEFAULT_DAYS, show_default=True, type=int)
@click.option("--out", "out_prefix", required=True, type=click.Path(path_type=Path),
              help="Write OUT.pem and OUT.key.")
def issue_cmd(ca_dir: Path, role: str, name: str, services: tuple[str, ...], wildcard: bool,
              no_scope: bool, hosts: tuple[str, ...], days: int, out_prefix: Path) -> None:
    """Issue one more certificate from an existing CA."""
    try:
        cert_path, key_path = pki.issue(ca_dir, role, name, list(services), wildcard,
                                        list(hosts), out_prefix, scoped=not no_scope, days=days)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    _console.print(_files_table({role: cert_path, f"{role}_key": key_path}))
    _console.print(f"Inspect: ztna certs show {cert_path}", highlight=False)


@certs.command(name="show")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def show_cmd(file: Path) -> None:
    """Print a certificate's subject, SANs, validity and the ztna identity derived from it."""
    try:
        chain = load_ca_file(file)
    except UsageError as exc:
        raise click.UsageError(str(exc)) from None
    now = dt.datetime.now(dt.UTC)
    for cert in chain:
        _console.print(_describe(cert, now))


def _describe(cert: x509.Certificate, now: dt.datetime) -> Table:
    table = Table(show_header=False, title=cert.subject.rfc4514_string())
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("issuer", cert.issuer.rfc4514_string())
    table.add_row("serial", f"{cert.serial_number:x}")
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    state = "EXPIRED" if now > end else "NOT YET VALID" if now < start else "valid"
    table.add_row("validity", f"{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC ({state})")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        table.add_row("SANs", ", ".join(str(n.value) for n in san) or "-")
    except x509.ExtensionNotFound:
        table.add_row("SANs", "(none)")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        table.add_row("EKU", ", ".join(o._name for o in eku))
    except x509.ExtensionNotFound:
        table.add_row("EKU", "(none)")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    table.add_row("CA", "yes" if is_ca else "no")
    table.add_row("sha256", certificate_fingerprint(cert))
    if not is_ca:
        table.add_row("identity", identity_from_certificate(cert).describe())
    return table
