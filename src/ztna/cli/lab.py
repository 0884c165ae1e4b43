"""`ztna lab`: drive the namespace lab (ztna.lab) from a shell. Needs root.

The lab outlives the command: `up` records it in /run/ztna-lab/<prefix>.json, and
every other subcommand (`exec`, `status`, `block`, `flush-nat`, `down`) attaches to
it by prefix (`--prefix`, or $ZTNA_LAB_PREFIX, default "zt").
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click

from ztna.errors import UsageError

F = TypeVar("F", bound=Callable[..., Any])
NAT_CHOICE = click.Choice(["none", "cone", "symmetric"])

prefix_option = click.option(
    "--prefix", "-p", default="zt", envvar="ZTNA_LAB_PREFIX", show_default=True,
    help="Namespace prefix (namespaces are PREFIX-NODE; at most 8 chars).",
)  # fmt: skip


def _friendly(fn: F) -> F:
    """Turn our UsageError (not root, no such lab, bad option) into one clear line."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper  # type: ignore[return-value]  # same signature as fn


def _attach(prefix: str) -> Any:
    from ztna.lab.lab import Lab, require_root

    require_root()
    return Lab.attach(prefix)


@click.group()
def lab() -> None:
    """Network lab in namespaces: relay, inet, NAT A + agent, NAT B + connector + app.

    \b
    Nodes: relay 203.0.113.10, inet 203.0.113.1, nata 203.0.113.11 (LAN 10.1.0.1),
    agent 10.1.0.10, natb 203.0.113.12 (LAN 10.2.0.1), conn 10.2.0.10, app 10.2.0.20.
    --delay is one way per WAN link: agent<->relay RTT ~ 2x, agent<->conn RTT ~ 4x.
    """


@lab.command()
@prefix_option
@click.option("--nat-a", type=NAT_CHOICE, default="cone", show_default=True)
@click.option("--nat-b", type=NAT_CHOICE, default="cone", show_default=True)
@click.option("--ip", "ip_mode", type=click.Choice(["4", "dual", "6only"]), default="4")
@click.option("--nat66", is_flag=True, help="IPv6 LANs: ULA fd00:a::/64, fd00:b::/64 + NAT66.")
@click.option("--delay", type=float, default=0.0, help="One-way delay per WAN link, ms.")
@click.option("--jitter", type=float, default=0.0, help="Uniform jitter of that delay, ms.")
@click.option("--loss", type=float, default=0.0, help="Loss per direction per WAN link, %.")
@click.option("--rate", default=None, help="tbf rate on each WAN link, e.g. 20mbit.")
@click.option("--udp-timeout", type=int, default=None, help="NAT UDP mapping lifetime, s.")
@_friendly
def up(
    prefix: str, nat_a: str, nat_b: str, ip_mode: str, nat66: bool, delay: float,
    jitter: float, loss: float, rate: str | None, udp_timeout: int | None,
) -> None:  # fmt: skip
    """Build the lab (replaces a leftover lab with the same prefix)."""
    from ztna.lab import Lab, LabConfig

    config = LabConfig(
        prefix=prefix, nat_a=nat_a, nat_b=nat_b, ip=ip_mode, nat66=nat66, delay_ms=delay,
        jitter_ms=jitter, loss_pct=loss, rate=rate, udp_timeout=udp_timeout,
    )  # fmt: skip
    Lab(config).up()
    click.echo(
        f"lab {prefix} up: nat-a={nat_a} nat-b={nat_b} ip={ip_mode} nat66={nat66} delay={delay}ms "
        f"jitter={jitter}ms loss={loss}% rate={rate or 'none'} "
        f"udp-timeout={udp_timeout or 'default'}"
    )


@lab.command()
@prefix_option
@_friendly
def down(prefix: str) -> None:
    """Kill the lab's processes and delete its namespaces (idempotent)."""
    from ztna.lab.lab import require_root, teardown

    require_root()
    problems = teardown(prefix)
    if problems:
        raise UsageError("; ".join(problems))
    click.echo(f"lab {prefix} down")


@lab.command(name="exec", context_settings={"ignore_unknown_options": True})
@prefix_option
@click.argument("node")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@_friendly
def exec_(prefix: str, node: str, cmd: tuple[str, ...]) -> None:
    """Run CMD inside NODE (use `--` before CMD); exits with CMD's status."""
    lab_ = _attach(prefix)
    rc = subprocess.run(["ip", "netns", "exec", lab_.ns(node), *cmd]).returncode
    sys.exit(rc)


@lab.command()
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_friendly
def status(prefix: str, as_json: bool) -> None:
    """Nodes, addresses, NATs, impairments and tracked processes."""
    st = _attach(prefix).status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"lab {prefix} ({'up' if st['up'] else 'INCOMPLETE'})")
    for col in ("node", "netns", "IPv4", "IPv6", "exists"):
        table.add_column(col)
    for node, n in st["nodes"].items():
        exists = "yes" if n["exists"] else "NO"
        table.add_row(node, n["netns"], n["ipv4"] or "-", n["ipv6"] or "-", exists)
    console.print(table)
    nats = ", ".join(f"NAT {w.upper()}: {v['mode']}" for w, v in st["nats"].items())
    console.print(f"{nats}; ip={st['config']['ip']} nat66={st['config']['nat66']}")
    imp = st["impairments"]
    console.print(
        f"delay {imp['delay_ms']} ms, jitter {imp['jitter_ms']} ms, loss {imp['loss_pct']} %, "
        f"rate {imp['rate'] or 'none'}, udp timeout {imp['udp_timeout'] or 'default'}"
    )
    for p in st["processes"]:
        state = "alive" if p["alive"] else "gone"
        console.print(f"pid {p['pid']} in {p['node']}: {' '.join(p['argv'])} ({state})")
    for node, blocks in st["blocks"].items():
        console.print(f"blocked on {node}: " + ", ".join(f"udp/{port} {d}" for port, d in blocks))


@lab.command(name="flush-nat")
@prefix_option
@click.argument("which", type=click.Choice(["a", "b"]))
@_friendly
def flush_nat(prefix: str, which: str) -> None:
    """Drop all mappings of NAT A or B (conntrack -F: a NAT reboot)."""
    _attach(prefix).flush_nat(which)
    click.echo(f"NAT {which.upper()} flushed")


@lab.command()
@prefix_option
@click.option("--direction", type=click.Choice(["in", "out", "both"]), default="in")
@click.argument("node")
@click.argument("port", type=click.IntRange(1, 65535))
@_friendly
def block(prefix: str, direction: str, node: str, port: int) -> None:
    """Drop UDP to PORT at NODE (in: arriving, out: sent by it)."""
    _attach(prefix).block_udp(node, port, direction=direction)
    click.echo(f"udp/{port} blocked ({direction}) on {node}")


@lab.command()
@prefix_option
@click.argument("node")
@click.argument("port", type=click.IntRange(1, 65535))
@_friendly
def unblock(prefix: str, node: str, port: int) -> None:
    """Remove the UDP blocks for PORT on NODE."""
    _attach(prefix).unblock_udp(node, port)
    click.echo(f"udp/{port} unblocked on {node}")
