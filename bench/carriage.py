"""TCP carriage in TUN mode: DATAGRAMs vs QUIC streams, over relay and direct, with loss.

    sudo .venv/bin/python bench/carriage.py            # full run (about 15 min)
    sudo .venv/bin/python bench/carriage.py --quick    # 1 MB + latency only

One `ztna.lab` (cone/cone NATs, IPv4, `delay_ms=10` on each NAT's WAN wire: 10 ms one way
Agent↔Intermediate and Intermediate↔Connector, 20 ms one way Agent↔Connector either way),
the Intermediate on `relay`, the Connector on `conn`, `http.server` on `app` serving 1 MB,
100 MB and 100 B files. For each path (direct; relay, forced by blocking the Connector's
P2P port 4434) and carriage (`--tcp-transport datagram|stream`) a fresh TUN Agent is
started; then for each loss (0, 1, 3 %, `lab.set_loss`, both NAT WANs) we measure:
* latency: N sequential HTTP GETs of 100 B, each on a new TCP connection (connect +
  request + response), p50/p95 in ms, failures counted;
* curl downloads of 1 MB and 100 MB (time_total, speed, sha256 checked); a transfer is
  capped at `--cap` seconds: a capped transfer reports its partial rate and `complete=false`.
The path is read from the Agent's status after each loss level (a direct path that fell
back to the relay under loss is reported as such). Output: `bench/results/carriage.{md,json,png}`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ztna.lab import Lab, LabConfig
from ztna.lab.config import unique_prefix
from ztna.worlds.lab_tun import PY, VIP4, World, make_files

ROOT = Path(__file__).resolve().parent.parent

LATENCY = (
    "import socket,sys,time,json\n"
    "host,n=sys.argv[1],int(sys.argv[2]); out=[]; fails=0\n"
    "req=b'GET /small HTTP/1.0\\r\\nHost: web\\r\\n\\r\\n'\n"
    "for i in range(n):\n"
    " t=time.perf_counter()\n"
    " try:\n"
    "  s=socket.create_connection((host,80),timeout=5); s.sendall(req); b=b''\n"
    "  while True:\n"
    "   d=s.recv(65536)\n"
    "   if not d: break\n"
    "   b+=d\n"
    "  s.close()\n"
    "  if not b.startswith(b'HTTP/1.0 200') or not b.endswith(b'x'*100): raise OSError('bad reply')\n"
    "  out.append((time.perf_counter()-t)*1000)\n"
    " except OSError:\n"
    "  fails+=1\n"
    "print(json.dumps({'ms':out,'fails':fails}))\n"
)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered) + 0.5)) - 1))], 1)


def latency(world: World, n: int) -> dict[str, Any]:
    r = world.lab.run("agent", [PY, "-c", LATENCY, VIP4, str(n)], check=False, timeout=n * 6 + 30)
    try:
        data = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"p50_ms": None, "p95_ms": None, "fails": n, "error": r.stderr[-300:]}
    ms = data["ms"]
    return {"p50_ms": pct(ms, 0.5), "p95_ms": pct(ms, 0.95), "mean_ms": round(statistics.fmean(ms), 1) if ms else None,
            "fails": data["fails"], "n": n}


def download(world: World, name: str, size: int, digest: str, cap: float) -> dict[str, Any]:
    res = world.curl(f"http://{VIP4}/{name}", max_time=cap)
    got = int(res.get("size") or 0)
    t = float(res.get("time_total") or cap)
    complete = res["rc"] == 0 and got == size
    return {"complete": complete, "sha256_ok": complete and res["sha256"] == digest,
            "bytes": got, "seconds": round(t, 2), "mbit_s": round(got * 8 / t / 1e6, 2) if t > 0 else None,
            "curl_rc": res["rc"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ztna-carriage-"))
    sizes = {"1m.bin": 1 << 20}
    if not args.quick:
        sizes["100m.bin"] = 100 << 20
    digests = make_files(work / "www", sizes)
    (work / "www" / "small").write_bytes(b"x" * 100)
    rows: list[dict[str, Any]] = []
    cfg = LabConfig(prefix=unique_prefix(), nat_a="cone", nat_b="cone", ip="4", delay_ms=10)
    started = time.time()
    with Lab(cfg) as lab:
        world = World(lab, work)
        try:
            world.start_infra(work / "www")
            for path in args.paths:
                if path == "relay":
                    lab.block_udp("conn", 4434, direction="both")
                for carriage in args.carriages:
                    lab.set_loss(0)
                    world.start_agent(carriage)
                    world.wait(path, timeout=30)
                    for loss in args.loss:
                        lab.set_loss(loss)
                        time.sleep(0.5)
                        row: dict[str, Any] = {"path": path, "carriage": carriage, "loss_pct": loss}
                        row["latency"] = latency(world, args.requests)
                        row["1MB"] = download(world, "1m.bin", sizes["1m.bin"], digests["1m.bin"], args.cap)
                        if not args.quick:
                            row["100MB"] = download(world, "100m.bin", sizes["100m.bin"], digests["100m.bin"], args.cap)
                        snap = world.status() or {}
                        svc = (snap.get("services") or [{}])[0]
                        p2p = ((snap.get("p2p") or {}).get("services") or {}).get("web", {})
                        row["path_after"] = svc.get("path")
                        row["direct_failures"] = p2p.get("direct_failures")
                        rows.append(row)
                        print(json.dumps(row), flush=True)
                    world.stop_agent()
                lab.unblock_udp("conn", 4434)
        finally:
            world.close()
    return {"config": {"lab": "cone/cone IPv4, delay_ms=10 per NAT WAN (20 ms one way agent-connector)",
                       "cap_s": args.cap, "requests": args.requests, "quick": args.quick},
            "started": started, "duration_s": round(time.time() - started, 1), "rows": rows}


def _rate(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "–"
    text = f"{cell['mbit_s']:.1f}" if cell.get("mbit_s") is not None else "–"
    if not cell["complete"]:
        text += f" (partial: {cell['bytes'] / 1e6:.0f} MB in {cell['seconds']:.0f} s)"
    elif not cell["sha256_ok"]:
        text += " (SHA MISMATCH)"
    return text


def markdown(result: dict[str, Any], command: str) -> str:
    lines = [
        "| path | carriage | loss | latency p50 / p95 ms (fails) | 1 MB Mbit/s | 100 MB Mbit/s | path after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lat = r["latency"]
        lines.append(f"| {r['path']} | {r['carriage']} | {r['loss_pct']} % | "
                     f"{lat['p50_ms']} / {lat['p95_ms']} ({lat['fails']}) | {_rate(r.get('1MB'))} | "
                     f"{_rate(r.get('100MB'))} | {r['path_after']} |")
    lines += ["", f"Lab: {result['config']['lab']}; transfers capped at {result['config']['cap_s']} s; "
              f"{result['config']['requests']} latency requests per row; run took {result['duration_s']} s.",
              "", f"Regenerate: `{command}`", ""]
    return "\n".join(lines)


def chart(result: dict[str, Any], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    combos = sorted({(r["path"], r["carriage"]) for r in rows})
    losses = sorted({r["loss_pct"] for r in rows})
    metrics = [("1MB", "1 MB download, Mbit/s"), ("100MB", "100 MB download, Mbit/s"), ("lat", "latency p50, ms")]
    metrics = [m for m in metrics if m[0] == "lat" or any(m[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    width = 0.8 / len(combos)
    for ax, (key, title) in zip(axes, metrics, strict=False):
        for i, (path, carriage) in enumerate(combos):
            vals = []
            for loss in losses:
                r = next((r for r in rows if (r["path"], r["carriage"], r["loss_pct"]) == (path, carriage, loss)), None)
                v = (r["latency"]["p50_ms"] if key == "lat" else (r.get(key) or {}).get("mbit_s")) if r else None
                vals.append(v or 0)
            ax.bar([x + i * width for x in range(len(losses))], vals, width, label=f"{path}/{carriage}")
        ax.set_xticks([x + width * (len(combos) - 1) / 2 for x in range(len(losses))])
        ax.set_xticklabels([f"{loss} % loss" for loss in losses])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return True


def _shown_python() -> str:
    """The interpreter running this benchmark, as the reader would type it: relative to the
    working directory when it lives below it (a clone's `.venv`), else its plain name."""
    exe = Path(sys.executable)
    try:
        return str(exe.relative_to(Path.cwd()))
    except ValueError:
        return exe.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 MB + latency only")
    ap.add_argument("--cap", type=float, default=40.0, help="seconds per transfer before it is cut off")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--loss", type=float, nargs="+", default=[0, 1, 3])
    ap.add_argument("--paths", nargs="+", default=["direct", "relay"], choices=["direct", "relay"])
    ap.add_argument("--carriages", nargs="+", default=["datagram", "stream"], choices=["datagram", "stream"])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "carriage"))
    args = ap.parse_args()
    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["sudo", _shown_python(), "bench/carriage.py", *sys.argv[1:]])
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result, command))
    png = chart(result, out.with_suffix(".png"))
    print(markdown(result, command))
    print(f"wrote {out}.json, {out}.md" + (f", {out}.png" if png else " (no matplotlib: no chart)"))


if __name__ == "__main__":
    main()
