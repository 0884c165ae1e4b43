"""The `ztna` command line.

Each subcommand lives in its own module and is imported only when used, so that
`ztna --help` stays fast and one broken subsystem cannot break the others.
"""

from __future__ import annotations

import importlib

import click

# name -> (module, attribute, one-line help shown by `ztna --help`)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "intermediate": ("ztna.cli.intermediate", "intermediate", "Run the public QUIC relay (Intermediate)."),
    "connector": ("ztna.cli.connector", "connector", "Run an App Connector next to private apps."),
    "agent": ("ztna.cli.agent", "agent", "Run the Agent (TUN split tunnel or userspace forwards)."),
    "client": ("ztna.cli.client", "client", "Scriptable test client (QAD, registration, echo, sizes)."),
    "certs": ("ztna.cli.certs", "certs", "Create a CA and mTLS certificates (no openssl needed)."),
    "status": ("ztna.cli.status", "status", "Show a running Agent's state."),
    "demo": ("ztna.cli.demo", "demo", "Self-contained end-to-end demo on this machine."),
    "lab": ("ztna.cli.lab", "lab", "Network lab in namespaces: NATs, IPv6, delay, loss (root)."),
    "bench": ("ztna.cli.bench", "bench", "Benchmarks against nebula, wireguard-go, sshuttle (root)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = SUBCOMMANDS.get(name)
        if entry is None:
            return None
        module_name, attr, _ = entry
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                return _not_built(name)
            raise
        return getattr(module, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def _not_built(name: str) -> click.Command:
    @click.command(name=name, help=SUBCOMMANDS[name][2] + " (not available in this build)")
    def missing() -> None:
        raise click.ClickException(f"'ztna {name}' is not available in this build")

    return missing


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ztna")
def main() -> None:
    """ztna: reach private apps (HTTP, SSH, databases, UDP) through a QUIC tunnel
    with mutual TLS, a direct peer-to-peer path when NATs allow, and a relay otherwise."""
