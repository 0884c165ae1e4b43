"""`ztna bench` harness: pure report/percentile checks, and a root smoke run of the CLI.

The smoke run uses --quick with a 1 s iperf3 on a few rows (baselines, wireguard-go when
installed, ztna via the Intermediate) and checks the artefacts and the honesty rules:
every row has a final status, missing tools say how to install them, measured rows carry
numbers and the path NAT A's conntrack saw. No speed is asserted (speed belongs in bench/).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ztna.bench.echo import percentile, summary
from ztna.bench.harness import Row, path_seen
from ztna.bench.report import added_udp_rtt, markdown, ratios


def test_connector_health_checks_leave_iperf3_alone() -> None:
    """Each iperf3 server serves exactly one test (`-s -1`): a health probe that connects to
    it is that test, and the measurement that follows is refused. The bench's Connector may
    check only the TCP echo port."""
    from ztna.bench.harness import APP_IPERF_PORT, APP_TCP_ECHO
    from ztna.bench.ztna_rows import CONNECTOR_SERVICE
    from ztna.connector.config import ServiceConfig, parse_service_flag

    service = ServiceConfig.model_validate(parse_service_flag(CONNECTOR_SERVICE))
    assert APP_IPERF_PORT in service.tcp
    checks = service.health_checks()
    assert [(c.kind, c.port) for c in checks] == [("tcp", APP_TCP_ECHO)]


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    data = [float(i) for i in range(1, 101)]
    assert percentile(data, 50) == 50.0
    assert percentile(data, 95) == 95.0
    assert summary([3.0, 1.0, 2.0]) == {"n": 3, "p50_ms": 2.0, "p95_ms": 3.0,
                                        "min_ms": 1.0, "max_ms": 3.0}


def test_path_seen() -> None:
    assert path_seen({"direct": 10, "relay": 5}) is None  # too few bytes to tell
    assert path_seen({"direct": 1_000_000, "relay": 5_000}) == "direct"
    assert path_seen({"direct": 100, "relay": 900_000}) == "relay"
    assert path_seen({"direct": 500_000, "relay": 500_000}) == "mixed"


def _rows() -> list[Row]:
    z = Row(key="ztna-direct", label="ztna direct", kind="ztna", status="ok",
            tcp_up_mbps=50.0, tcp_rtt_p50_ms=1.0, udp_rtt_p50_ms=0.9)
    n = Row(key="nebula-direct", label="nebula", kind="peer", status="ok",
            tcp_up_mbps=200.0, tcp_rtt_p50_ms=0.25, udp_rtt_p50_ms=0.3)
    s = Row(key="sshuttle", label="sshuttle", kind="peer", status="missing",
            note="not installed: sshuttle")
    u = Row(key="underlay", label="underlay", kind="baseline", status="ok",
            udp_rtt_p50_ms=0.1)
    return [z, n, s, u]


def test_ratios_only_where_both_measured() -> None:
    rat = ratios(_rows())
    assert [(e["ztna"], e["peer"]) for e in rat] == [("ztna-direct", "nebula-direct"),
                                                     ("ztna-direct", "underlay")]
    assert rat[0]["tcp_up"] == 0.25 and rat[0]["tcp_rtt_p50"] == 4.0
    assert rat[0]["tcp_down"] is None
    added = {a["path"]: a["added_ms"] for a in added_udp_rtt(_rows())}
    assert added == {"ztna-direct": 0.8, "nebula-direct": 0.2}


def test_markdown_keeps_missing_rows_visible() -> None:
    env = {"lab": {"nat_a": "cone", "nat_b": "cone", "delay_ms": 0, "loss_pct": 0},
           "cpu_count": 2, "kernel": "k", "ztna_version": "0", "git_commit": "x"}
    result = {"started": "t", "environment": env, "settings": {"seconds": 1, "count": 5},
              "ztna_warmup": {"reconnect / 0-RTT": None}}
    text = markdown(result, _rows())
    assert "| sshuttle | missing |" in text and "not installed: sshuttle" in text
    assert "| ztna-direct | nebula-direct | ×0.25 | – | ×4 | ×3 |" in text


@pytest.mark.root
def test_ztna_bench_quick_smoke(tmp_path: Path) -> None:
    from ztna.lab.config import unique_prefix

    rows = ["lan", "underlay", "wireguard", "ztna-relay"]
    out = tmp_path / "out.json"
    md = tmp_path / "bench.md"
    argv = [sys.executable, "-m", "ztna", "bench", "--quick", "-t", "1", "--count", "10",
            "--rows", ",".join(rows), "--prefix", unique_prefix(), "--json", str(out),
            "--md", str(md)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    got = {r["key"]: r for r in data["rows"]}
    assert list(got) == rows
    assert data["environment"]["cpu_count"] == os.cpu_count()
    for key in ("lan", "underlay", "ztna-relay"):
        r = got[key]
        assert r["status"] in ("ok", "partial"), (key, r["note"])
        assert r["tcp_up_mbps"] and r["tcp_up_mbps"] > 0
        assert r["udp_rtt_p50_ms"] and r["udp_rtt_p50_ms"] > 0
    assert got["underlay"]["extra"]["path_seen"] == "direct"
    assert got["ztna-relay"]["extra"]["path_seen"] == "relay"
    wg = got["wireguard"]
    if shutil.which("wireguard-go") is None:
        assert wg["status"] == "missing" and "apt-get install" in wg["note"]
    else:
        assert wg["status"] in ("ok", "partial"), wg["note"]
    text = md.read_text()
    assert "| ztna-relay | wireguard |" in text or wg["status"] == "missing"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert data["png"] is None and "matplotlib" in data["png_note"]
    else:
        assert Path(data["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
