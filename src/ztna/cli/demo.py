"""`ztna demo`: a complete tunnel on this machine, proven with real bytes (docs/demo.md).

    ztna demo                      # userspace forwards without root, TUN in namespaces as root
    ztna demo --json               # one JSON object on stdout, nothing else
    ztna demo --lab --nat-a cone --nat-b symmetric --delay 20   # inside the namespace lab (root)

Exit status 0 only when every check that ran was byte-exact; 1 otherwise; 2 for bad usage.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import click

NATS = ["none", "cone", "symmetric"]


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@click.command(name="demo")
@click.option("--size", type=click.IntRange(min=1), default=20_000_000, show_default=True,
              metavar="BYTES", help="Size of the random file downloaded through the tunnel.")
@click.option("--mode", type=click.Choice(["userspace", "tun"]),
              help="Agent mode. Default: tun (in namespaces) as root, userspace otherwise; "
                   "env ZTNA_DEMO_MODE=userspace forces userspace.")
@click.option("--lab", is_flag=True,
              help="Run inside the namespace lab: NATs, IPv6, delay, loss (root).")
@click.option("--nat-a", type=click.Choice(NATS), default="none", show_default=True,
              help="--lab: the Agent's NAT.")
@click.option("--nat-b", type=click.Choice(NATS), default="none", show_default=True,
              help="--lab: the Connector's NAT.")
@click.option("--ip", type=click.Choice(["4", "6", "dual", "6only"]), default="4",
              show_default=True,
              help="--lab: IP families of the lab ('6' = '6only').")
@click.option("--delay", type=click.FloatRange(min=0), default=0.0, metavar="MS",
              help="--lab: one-way delay per WAN link.")
@click.option("--loss", type=click.FloatRange(min=0, max=100), default=0.0, metavar="PCT",
              help="--lab: packet loss per WAN link and direction.")
@click.option("--transport", type=click.Choice(["datagram", "stream"]), default="stream",
              show_default=True,
              help="TUN mode TCP carriage (the Agent's --tcp-transport).")
@click.option("--no-reconnect", is_flag=True, help="Skip the Agent restart measurements.")
@click.option("--keep", is_flag=True, help="Keep the temp dir (certificates, logs) afterwards.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object instead of the step list.")
def demo(size: int, mode: str | None, lab: bool, nat_a: str, nat_b: str, ip: str, delay: float,
         loss: float, transport: str, no_reconnect: bool, keep: bool, as_json: bool) -> None:
    """Start an Intermediate, a Connector with an HTTP and a UDP echo app, and an Agent as
    real processes, push bytes through the tunnel, check them, and clean everything up."""
    from ztna.demo import DemoOptions, run_demo
    from ztna.errors import UsageError

    if not lab and (nat_a != "none" or nat_b != "none" or ip != "4" or delay or loss):
        raise click.UsageError("--nat-a/--nat-b/--ip/--delay/--loss need --lab")
    options = DemoOptions(size=size, mode=mode, lab=lab, nat_a=nat_a, nat_b=nat_b,
                          ip="6only" if ip == "6" else ip, delay_ms=delay, loss_pct=loss,
                          transport=transport, reconnect=not no_reconnect, keep=keep)
    # Both stop the run through the same `finally` (children killed, namespaces and temp dir
    # removed); SIGINT explicitly, since a shell starts background jobs with it ignored.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)

    emit = None
    console = None
    if not as_json:
        from rich.console import Console

        console = Console(highlight=False, emoji=False)

        def emit(ok: bool | None, text: str) -> None:
            mark = {True: "[green]✓[/green]", False: "[red]✗[/red]",
                    None: "[blue]•[/blue]"}[ok]
            console.print(f"{mark} {text}", soft_wrap=True)

        console.print("[bold]ztna demo[/bold]: Intermediate + Connector + Agent as real processes")
    try:
        result = run_demo(options, emit)
    except UsageError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "errors": [str(exc)]}))
        else:
            click.echo(f"ztna demo: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        if as_json:
            click.echo(json.dumps({"ok": False, "errors": ["interrupted"]}))
        click.echo("ztna demo: interrupted; everything was stopped and removed", err=True)
        sys.exit(130)

    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        assert console is not None
        _verdict(console, result)
    sys.exit(0 if result["ok"] else 1)


def _verdict(console: Any, r: dict[str, Any]) -> None:
    if r["ok"]:
        parts = [f"{r['http_bytes']:,} bytes over HTTP at {r['http_mbps']} Mbit/s (sha256 ok)",
                 "UDP echo byte-exact"]
        if r["icmp_ok"]:
            parts.append("ICMP echo ok")
        if r.get("tcp_carriage"):
            parts.append(f"TCP carriage {r['tcp_carriage']}")
        parts.append(f"path {r['path']}")
        console.print(f"\n[bold green]PASS[/bold green] ({r['mode']} mode): " + ", ".join(parts))
    else:
        console.print(f"\n[bold red]FAIL[/bold red] ({r['mode']} mode): "
                      f"{len(r['errors'])} problem(s)")
        for e in r["errors"]:
            console.print(f"  - {e}", soft_wrap=True)
