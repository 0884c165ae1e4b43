"""`ztna status`: ask a running Agent for its state over its local control socket."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click


def _default_dirs() -> list[Path]:
    from ztna.agent.config import default_state_dir

    return list(dict.fromkeys([default_state_dir(), Path("/run/ztna-agent")]))


def _candidates(state_dir: str | None, name: str | None) -> list[Path]:
    dirs = [Path(state_dir)] if state_dir else _default_dirs()
    out: list[Path] = []
    for d in dirs:
        if name:
            out.append(d / f"{name}.sock")
        elif d.is_dir():
            out.extend(sorted(d.glob("*.sock")))
    return out


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _render(snap: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # On a terminal rich fits the table to the window; into a pipe or file nothing may be
    # cut (rich would assume 80 columns), so the width is then unlimited: each line is as
    # long as its content, without colour codes.
    tty = sys.stdout.isatty()
    console = Console(emoji=False, highlight=False, width=None if tty else 100_000, soft_wrap=not tty)
    a, i = snap["agent"], snap["intermediate"]
    since = i.get("connected_since")
    up = f"{time.time() - since:.0f}s" if since else "-"
    console.print(f"[bold]Agent {a['name']}[/bold] (pid {a['pid']}, {a['mode']} mode)")
    state_style = "green" if i["state"] == "connected" else "yellow"
    # Addresses like [::1]:4433 and error texts are data, not rich markup.
    console.print(f"Intermediate {escape(i['target'])} ({escape(i['address'])}): [{state_style}]{i['state']}[/{state_style}]"
                  f" for {up}, RTT {i['rtt_ms'] if i['rtt_ms'] is not None else '-'} ms,"
                  f" seen as {escape(i['observed_address'] or '-')}, max DATAGRAM {i['max_datagram_payload'] or '-'},"
                  f" reconnects {i['reconnects']}")
    if i.get("handshake"):
        z = i.get("zero_rtt") or {}
        took = f", connected and registered in {i['connect_ms']} ms" if i.get("connect_ms") is not None else ""
        console.print(f"  last handshake: {i['handshake']}{took};"
                      f" 0-RTT accepted {z.get('accepted', 0)} of {z.get('attempts', 0)} resumptions")
    if i["state"] != "connected" and i.get("last_error"):
        at = f" (at {i['last_error_at']})" if i.get("last_error_at") else ""
        console.print(f"  last error: {escape(i['last_error'])}{at}")
    if "tun" in snap:
        t = snap["tun"]
        console.print(f"TUN {t['name']}: mtu {t['mtu']}, {' '.join(t['addresses'])}")
    table = Table()
    for col in ("service", "virtual IPs", "registered", "connector", "path", "sent", "received", "max packet"):
        table.add_column(col)
    for s in snap["services"]:
        reg = s["registration"]
        reg_text = {"acked": "[green]yes[/green]", "pending": "[yellow]pending[/yellow]"}.get(
            reg, f"[red]refused ({s['nack']})[/red]")
        conn = _connector_text(s)
        table.add_row(s["id"], " ".join(s["virtual_ips"] + s.get("domains", [])), reg_text, conn, _path_text(snap, s),
                      f"{_human_bytes(s['tx_bytes'])} / {s['tx_packets']} pkts",
                      f"{_human_bytes(s['rx_bytes'])} / {s['rx_packets']} pkts",
                      str(s["max_packet"] or "-"))
    console.print(table)
    us = snap.get("userspace")
    if us:
        for f in us.get("listeners", []):
            console.print(f"  {escape(f)}")


def _connector_text(s: dict[str, Any]) -> str:
    """Who serves the service: the direct peer when the path is direct, else the Connector
    the Intermediate named, else just whether one is up (`-`: not told yet)."""
    from rich.markup import escape  # `[fd00::2]:4434` and certificate names are not markup

    if s.get("direct_peer"):
        return f"[green]{escape(s['direct_peer'])}[/green]"
    if s["connector_up"] is False:
        return "[red]down[/red]"
    if s["connector_up"] and s.get("healthy") is False:
        # Every Connector's backend failed its health checks: new flows still go to the
        # one that failed longest ago (named), so say that rather than just "up".
        who = f" {escape(s['connector'])}" if s.get("connector") else ""
        return f"[red]no healthy connector[/red]: new flows to least-recently-failed{who}"
    if s["connector_up"]:
        return f"up: {escape(s['connector'])}" if s.get("connector") else "up"
    return "-"


def _path_text(snap: dict[str, Any], s: dict[str, Any]) -> str:
    """`direct (warm-up 120 ms, 0-RTT)` / `relay (cooldown, retry in 12 s)` from the P2P part."""
    p = ((snap.get("p2p") or {}).get("services") or {}).get(s["id"])
    if not p:
        return str(s["path"])
    if s["path"] == "direct":
        bits = [f"warm-up {p['warmup_ms']:.0f} ms" if p.get("warmup_ms") is not None else "",
                p.get("handshake") or ""]
        detail = ", ".join(b for b in bits if b)
        return f"[green]direct[/green] ({detail})" if detail else "[green]direct[/green]"
    state = p.get("path_state") or ""
    if p.get("retry_in_s") is not None:
        state = f"{state}, retry in {p['retry_in_s']:.0f} s" if state else f"retry in {p['retry_in_s']:.0f} s"
    return f"relay ({state})" if state and state != "relay" else "relay"


@click.command(name="status")
@click.option("--state-dir", type=click.Path(file_okay=False), help="Where the Agent keeps its socket.")
@click.option("--name", help="Agent name (default: every Agent found).")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON state.")
def status(state_dir: str | None, name: str | None, as_json: bool) -> None:
    """Show a running Agent's state (no root needed)."""
    from ztna.agent.control import query

    candidates = _candidates(state_dir, name)
    socks = [p for p in candidates if p.exists()]
    where = ", ".join(str(p) for p in candidates) if candidates else (
        state_dir or " or ".join(str(d) for d in _default_dirs()))
    hint = "start `ztna agent`, or point at it with --state-dir DIR and --name NAME"
    snaps = []
    stale = []
    for path in socks:
        try:
            snaps.append(query(path))
        except (ConnectionRefusedError, FileNotFoundError):
            stale.append(path)      # left behind by an Agent that was killed
        except OSError as exc:
            raise click.ClickException(f"agent at {path} did not answer: {exc}") from None
    if not snaps:
        what = f"nothing answers on {', '.join(map(str, stale))}" if stale else f"no status socket at {where}"
        raise click.ClickException(f"agent not running ({what}); {hint}")
    if as_json:
        click.echo(json.dumps(snaps[0] if len(snaps) == 1 else snaps, indent=2))
        return
    for snap in snaps:
        _render(snap)
