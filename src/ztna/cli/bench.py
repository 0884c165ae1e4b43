"""`ztna bench`: ztna vs nebula / wireguard-go / sshuttle in the namespace lab (root)."""

from __future__ import annotations

import json
import os
import sys

import click

from ztna.errors import UsageError


@click.command(name="bench")
@click.option("--json", "json_path", type=click.Path(dir_okay=False),
              help="Write all numbers + environment here.")
@click.option("--md", "md_path", type=click.Path(dir_okay=False),
              help="Markdown report (default bench/results/bench-<timestamp>.md).")
@click.option("--png", "png_path", type=click.Path(dir_okay=False),
              help="Chart (default next to the Markdown).")
@click.option("--quick", is_flag=True, help="3 s per iperf3 direction, 50 echo round trips.")
@click.option("-t", "--seconds", type=float,
              help="iperf3 seconds per direction (default 10, --quick 3).")
@click.option("--count", type=int,
              help="Echo round trips per latency test (default 200, --quick 50).")
@click.option("--nat-a", type=click.Choice(["none", "cone", "symmetric"]), default="cone",
              show_default=True)
@click.option("--nat-b", type=click.Choice(["none", "cone", "symmetric"]), default="cone",
              show_default=True)
@click.option("--delay", type=float, default=0.0, show_default=True,
              help="One-way ms per WAN link.")
@click.option("--loss", type=float, default=0.0, show_default=True,
              help="Loss %% per WAN link direction.")
@click.option("--rows", help="Comma-separated subset of rows (default all): lan,underlay,"
              "ztna-direct,ztna-relay,nebula-direct,nebula-relay,wireguard,sshuttle.")
@click.option("--directions", default="up,down", show_default=True,
              help="iperf3 directions: up, down or both.")
@click.option("--prefix", default="ztb", show_default=True, help="Lab namespace prefix.")
@click.option("--keep-workdir", is_flag=True, help="Keep configs and logs of every row.")
def bench(json_path: str | None, md_path: str | None, png_path: str | None, quick: bool,
          seconds: float | None, count: int | None, nat_a: str, nat_b: str, delay: float,
          loss: float, rows: str | None, directions: str, prefix: str, keep_workdir: bool) -> None:
    """Benchmark ztna against nebula, wireguard-go and sshuttle in one lab run (root).

    Peer tools are not installed for you; rows whose tool is missing say so. Install:
    apt-get install -y --no-install-recommends nebula wireguard-tools wireguard-go
    sshuttle openssh-server iperf3 (and nftables iproute2 conntrack for the lab).
    """
    from ztna.bench import report, runner

    if os.geteuid() != 0:
        raise click.ClickException("ztna bench needs root (network namespaces): run as root")
    dirs = tuple(d.strip() for d in directions.split(",") if d.strip())
    if not dirs or any(d not in ("up", "down") for d in dirs):
        raise click.ClickException("--directions takes up, down or up,down")
    opts = runner.BenchOptions(
        seconds=seconds if seconds is not None else (3.0 if quick else 10.0),
        count=count if count is not None else (50 if quick else 200),
        connects=5 if quick else 20,
        directions=dirs, nat_a=nat_a, nat_b=nat_b, delay_ms=delay, loss_pct=loss,
        rows=tuple(r.strip() for r in rows.split(",")) if rows else tuple(runner.ROWS),
        prefix=prefix, keep_workdir=keep_workdir)
    try:
        result, table = runner.run(opts, progress=lambda m: click.echo(m, err=True))
    except UsageError as exc:
        raise click.ClickException(str(exc)) from None
    except runner.RowError as exc:
        raise click.ClickException(str(exc)) from None
    stamp = result["started"].replace(":", "").replace("-", "")
    if md_path is None:
        out_dir = os.path.join(runner.default_bench_dir(), "results")
        md_path = os.path.join(out_dir, f"bench-{stamp}.md")
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    if png_path is None:
        png_path = os.path.splitext(md_path)[0] + ".png"
    skipped = report.png(png_path, result, table)
    result["png"] = None if skipped else png_path
    if skipped:
        result["png_note"] = skipped
    text = report.markdown(result, table)
    if not skipped:
        text += f"\n![chart]({os.path.basename(png_path)})\n"
    with open(md_path, "w") as f:
        f.write(text)
    report.print_rich(result, table)
    click.echo(f"markdown: {md_path}", err=True)
    click.echo(f"png: {png_path}" if not skipped else f"png: skipped ({skipped})", err=True)
    if json_path:
        os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        click.echo(f"json: {json_path}", err=True)
    if not any(r.status in ("ok", "partial") for r in table):
        sys.exit(1)
