"""`--cluster` / `--advertise` validation: a bad value is one line and exit 2, before anything
is bound or dialled; a store that cannot be reached at start-up is a failure to start (1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ztna.certs import init_pki
from ztna.cluster.url import parse_store_url

ZTNA = [sys.executable, "-m", "ztna"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo"])
    return d


def test_store_url_forms() -> None:
    u = parse_store_url("redis://:secret@10.0.0.5:6380/3")
    assert (u.host, u.port, u.db, u.tls) == ("10.0.0.5", 6380, 3, False)
    assert u.redacted() == "redis://10.0.0.5:6380/3"          # no password in logs
    v = parse_store_url("rediss://[fd00::5]")
    assert (v.host, v.port, v.db, v.tls) == ("fd00::5", 6379, 0, True)
    assert v.redacted() == "rediss://[fd00::5]:6379/0"


@pytest.mark.parametrize(("args", "expected"), [
    (["--cluster", "http://127.0.0.1:6379/0", "--advertise", "127.0.0.1:4433"], "must be redis://"),
    (["--cluster", "redis://:6379/0", "--advertise", "127.0.0.1:4433"], "missing host"),
    (["--cluster", "redis://127.0.0.1:99999/0", "--advertise", "127.0.0.1:4433"], "bad port"),
    (["--cluster", "redis://127.0.0.1:6379/x", "--advertise", "127.0.0.1:4433"], "database must be a number"),
    (["--cluster", "redis://127.0.0.1:6379/16", "--advertise", "127.0.0.1:4433"], "out of range"),
    (["--cluster", "redis://127.0.0.1:6379/0?socket_timeout=9", "--advertise", "127.0.0.1:4433"], "no query"),
    (["--cluster", "redis://127.0.0.1:6379/0"], "cluster needs advertise"),
    (["--advertise", "127.0.0.1:4433"], "advertise only makes sense with cluster"),
    (["--cluster", "redis://127.0.0.1:6379/0", "--advertise", "0.0.0.0:4433"], "wildcard"),
    (["--cluster", "redis://127.0.0.1:6379/0", "--advertise", "127.0.0.1"], "missing port"),
])
def test_bad_cluster_flags_exit_2_with_one_line(pki: Path, args: list[str], expected: str) -> None:
    proc = subprocess.run([*ZTNA, "intermediate", "--pki", str(pki), "--metrics", "off", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_config_file_keys(pki: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "i.toml"
    cfg.write_text('cluster = "ftp://x"\nadvertise = "127.0.0.1:4433"\n')
    proc = subprocess.run([*ZTNA, "intermediate", "--pki", str(pki), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid cluster = 'ftp://x'" in proc.stderr, proc.stderr


def test_unreachable_store_at_start_is_a_failure_to_start(pki: Path) -> None:
    import socket

    with socket.socket() as s:          # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([*ZTNA, "intermediate", "--pki", str(pki), "--metrics", "off",
                           "--listen", "127.0.0.1:0", "--cluster", f"redis://:pw@127.0.0.1:{port}/0",
                           "--advertise", "127.0.0.1:4433"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert f"cluster store redis://127.0.0.1:{port}/0 unreachable" in proc.stderr, proc.stderr
    assert "pw" not in proc.stderr
