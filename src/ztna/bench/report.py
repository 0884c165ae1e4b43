"""Turn a finished run into Markdown, a rich terminal table, JSON and a PNG chart.

Ratios are always ztna / peer: above 1 means ztna moved more bytes per second
(throughput) or took longer per round trip (latency). A ratio is only printed when
both numbers were measured; a missing row stays visible with its reason.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ztna.bench.harness import Row

COLUMNS = ("path", "status", "TCP up Mbit/s", "TCP down Mbit/s", "TCP RTT p50 / p95 ms",
           "connect+RTT p50 ms", "UDP RTT p50 / p95 ms", "underlay path", "note")


def _f(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _pair(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None and b is None:
        return "–"
    return f"{_f(a, digits)} / {_f(b, digits)}"


def row_cells(row: Row) -> list[str]:
    seen = row.extra.get("path_seen")
    return [
        row.label, row.status,
        _f(row.tcp_up_mbps), _f(row.tcp_down_mbps),
        _pair(row.tcp_rtt_p50_ms, row.tcp_rtt_p95_ms),
        _f(row.connect_p50_ms, 2),
        _pair(row.udp_rtt_p50_ms, row.udp_rtt_p95_ms),
        seen or "–",
        row.note.replace("|", "/").replace("\n", " ")[:300],
    ]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(rows: list[Row]) -> list[dict[str, Any]]:
    """ztna row x every other measured row: throughput and latency ratios."""
    out = []
    for z in (r for r in rows if r.kind == "ztna"):
        for p in (r for r in rows if r.kind != "ztna"):
            entry = {
                "ztna": z.key, "peer": p.key,
                "tcp_up": _ratio(z.tcp_up_mbps, p.tcp_up_mbps),
                "tcp_down": _ratio(z.tcp_down_mbps, p.tcp_down_mbps),
                "tcp_rtt_p50": _ratio(z.tcp_rtt_p50_ms, p.tcp_rtt_p50_ms),
                "udp_rtt_p50": _ratio(z.udp_rtt_p50_ms, p.udp_rtt_p50_ms),
            }
            if any(v is not None for k, v in entry.items() if k not in ("ztna", "peer")):
                out.append(entry)
    return out


def added_udp_rtt(rows: list[Row]) -> list[dict[str, Any]]:
    """UDP echo p50 of each tunnel minus the plain underlay (same wires, no tunnel)."""
    base = next((r for r in rows if r.key == "underlay"), None)
    if base is None or base.udp_rtt_p50_ms is None:
        return []
    return [{"path": r.key, "udp_rtt_p50_ms": r.udp_rtt_p50_ms,
             "added_ms": round(r.udp_rtt_p50_ms - base.udp_rtt_p50_ms, 4)}
            for r in rows if r.kind != "baseline" and r.udp_rtt_p50_ms is not None]


def markdown(result: dict[str, Any], rows: list[Row]) -> str:
    env = result["environment"]
    lab = env["lab"]
    lines = [
        f"# ztna bench — {result['started']}",
        "",
        f"Lab: NAT A {lab['nat_a']}, NAT B {lab['nat_b']}, delay {lab['delay_ms']} ms one-way per "
        f"WAN link, loss {lab['loss_pct']} %. iperf3 {result['settings']['seconds']} s per "
        f"direction, {result['settings']['count']} echo round trips. {env['cpu_count']} CPUs, "
        f"kernel {env['kernel']}, ztna {env['ztna_version']} ({env.get('git_commit') or '?'}).",
        "All paths run from the Agent node to the app 10.2.0.20 behind the Connector node "
        "(ztna: its virtual IP 10.100.0.20). \"underlay path\" is what NAT A's conntrack saw.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(row_cells(r)) + " |" for r in rows]
    rat = ratios(rows)
    lines += ["", "## ztna / peer ratios", "",
              "Throughput > 1: ztna faster. RTT > 1: ztna slower.", "",
              "| ztna path | vs | TCP up | TCP down | TCP RTT p50 | UDP RTT p50 |",
              "|---|---|---|---|---|---|"]
    if not rat:
        lines.append("| – | – | – | – | – | – |")
    for e in rat:
        lines.append(f"| {e['ztna']} | {e['peer']} | " + " | ".join(
            "–" if e[k] is None else f"×{e[k]:.3g}"
            for k in ("tcp_up", "tcp_down", "tcp_rtt_p50", "udp_rtt_p50")) + " |")
    added = added_udp_rtt(rows)
    lines += ["", "## Added UDP RTT vs the underlay (no tunnel, same wires)", ""]
    if added:
        lines += ["| path | UDP RTT p50 ms | added ms |", "|---|---|---|"]
        lines += [f"| {a['path']} | {a['udp_rtt_p50_ms']:.3f} | {a['added_ms']:+.3f} |"
                  for a in added]
    else:
        lines.append("Not available (the underlay row has no UDP number).")
    lines += ["", "## ztna warm-up and reconnect", ""]
    for key, value in result["ztna_warmup"].items():
        lines.append(f"- **{key}**: `{json.dumps(value)}`")
    lines.append("")
    return "\n".join(lines)


def print_rich(result: dict[str, Any], rows: list[Row]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"ztna bench {result['started']}")
    for col in COLUMNS[:-1]:
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "partial": "yellow", "failed": "red", "missing": "dim"}
    for r in rows:
        cells = row_cells(r)[:-1]
        cells[1] = f"[{style.get(r.status, 'white')}]{r.status}[/]"
        table.add_row(*cells)
    console.print(table)
    for r in rows:
        if r.note:
            console.print(f"  [bold]{r.key}[/bold]: {r.note}", highlight=False)
    rat = ratios(rows)
    if rat:
        t2 = Table(title="ztna / peer (throughput >1 = ztna faster; RTT >1 = ztna slower)")
        for col in ("ztna", "vs", "TCP up", "TCP down", "TCP RTT p50", "UDP RTT p50"):
            t2.add_column(col)
        for e in rat:
            t2.add_row(e["ztna"], e["peer"], *("–" if e[k] is None else f"×{e[k]:.3g}" for k in
                                               ("tcp_up", "tcp_down", "tcp_rtt_p50",
                                                "udp_rtt_p50")))
        console.print(t2)


def png(path: str, result: dict[str, Any], rows: list[Row]) -> str | None:
    """Write the chart; returns None on success or the reason it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'ztna[bench]'); no PNG written"
    shown = [r for r in rows if r.tcp_up_mbps is not None or r.tcp_down_mbps is not None
             or r.tcp_rtt_p50_ms is not None]
    if not shown:
        return "no row has numbers; no PNG written"
    names = [r.label for r in shown]
    x = list(range(len(shown)))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(9.0, 1.3 * len(shown)), 9.5))
    w = 0.38
    up = [r.tcp_up_mbps or 0 for r in shown]
    down = [r.tcp_down_mbps or 0 for r in shown]
    colors = ["tab:red" if r.kind == "ztna" else "tab:gray" if r.kind == "baseline"
              else "tab:blue" for r in shown]
    ax1.bar([i - w / 2 for i in x], up, w, label="up (agent→app)", color=colors)
    ax1.bar([i + w / 2 for i in x], down, w, label="down (app→agent)", color=colors,
            alpha=0.55)
    ax1.set_yscale("log")
    ax1.set_ylabel("TCP Mbit/s (log)")
    ax1.set_title("iperf3 throughput (solid up, light down)")
    tcp = [r.tcp_rtt_p50_ms or 0 for r in shown]
    udp = [r.udp_rtt_p50_ms or 0 for r in shown]
    ax2.bar([i - w / 2 for i in x], tcp, w, label="TCP echo p50", color=colors)
    ax2.bar([i + w / 2 for i in x], udp, w, label="UDP echo p50", color=colors, alpha=0.55)
    ax2.set_ylabel("round trip ms")
    ax2.set_title("request/response latency (solid TCP, light UDP)")
    for ax in (ax1, ax2):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    lab = result["environment"]["lab"]
    fig.suptitle(f"ztna bench {result['started']} — NAT {lab['nat_a']}/{lab['nat_b']}, "
                 f"delay {lab['delay_ms']} ms, loss {lab['loss_pct']} % "
                 "(red: ztna, blue: peers, gray: no tunnel)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
