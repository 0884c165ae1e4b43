"""Garbage on the Connector's P2P port: every dropped datagram is counted under a reason.

A real `ztna intermediate` and `ztna connector` (subprocesses on loopback); N datagrams of
several kinds of junk are sent to the P2P port, and the sum of
`ztna_connector_p2p_dropped_datagrams_total` on the Connector's /metrics must grow by
exactly N (none lost without a trace, none counted twice).
"""

from __future__ import annotations

import random
import re
import signal
import socket
import struct
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "intermediate"))
from intermediate_helpers import ZTNA, IntermediateProc, free_tcp_port, free_udp_port  # noqa: E402

from ztna import procs
from ztna.certs import init_pki
from ztna.wire.probe import PROBE_REQUEST, PROBE_RESPONSE, PROBE_VERSION

pytestmark = pytest.mark.timeout(120)
DROPS = "ztna_connector_p2p_dropped_datagrams_total"


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        return r.read().decode()


def _drops(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2))
            for m in re.finditer(DROPS + r'\{reason="([^"]+)"\} (\S+)', text)}


def _received(text: str) -> float:
    m = re.search(r'ztna_quic_datagrams_received_total\{socket="p2p"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _garbage(rng: random.Random) -> list[bytes]:
    out: list[bytes] = []
    for _ in range(50):
        out.append(rng.randbytes(rng.randint(1, 3)))                       # short
        out.append(bytes([rng.randrange(0x40)]) + rng.randbytes(rng.randint(0, 200)))  # < 0x40
        # long header junk: random version (not QUIC v1) or a v1 non-Initial for no connection
        out.append(bytes([0xC0 | rng.randrange(0x40)]) + rng.randbytes(rng.randint(4, 600)))
        out.append(bytes([0xE0]) + struct.pack(">I", 1) + bytes([8]) + rng.randbytes(8)
                   + bytes([8]) + rng.randbytes(8) + rng.randbytes(60))   # v1 Handshake
        out.append(bytes([0x40 | rng.randrange(0x40)]) + rng.randbytes(rng.randint(8, 300)))  # short hdr
        for kind in (PROBE_REQUEST, PROBE_RESPONSE):                    # probes of no session
            out.append(bytes([kind, PROBE_VERSION]) + rng.randbytes(8 + rng.randint(0, 40)))
        out.append(bytes([PROBE_REQUEST, PROBE_VERSION + 1]) + rng.randbytes(30))  # bad version
        out.append(b"")                                                   # empty
    return out


def test_every_garbage_datagram_on_the_p2p_port_is_counted(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["web"])
    inter = IntermediateProc(["--pki", str(pki)], tmp_path / "intermediate.log").start()
    p2p, metrics = free_udp_port(), free_tcp_port()
    conn = procs.spawn(
        [*ZTNA, "connector", "--intermediate", f"127.0.0.1:{inter.port}", "--server-name",
         "localhost", "--pki", str(pki), "--service", "web=10.100.0.2;udp:7=127.0.0.1:9",
         "--p2p-port", str(p2p), "--metrics", f"127.0.0.1:{metrics}"],
        log=tmp_path / "connector.log")
    try:
        deadline = time.monotonic() + 20
        text = ""
        while time.monotonic() < deadline:
            assert conn.poll() is None, (tmp_path / "connector.log").read_text()
            try:
                text = _metrics(metrics)
                if 'ztna_connector_service_registered{service="web"} 1.0' in text:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        before, received = _drops(text), _received(text)
        assert before, text  # every reason is exported from the start
        junk = _garbage(random.Random(1234))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i, d in enumerate(junk):
                s.sendto(d, ("127.0.0.1", p2p))
                if i % 50 == 0:
                    time.sleep(0.005)  # stay well inside the socket buffer
        n = len(junk)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = _metrics(metrics)
            if _received(text) - received >= n:
                break
            time.sleep(0.1)
        time.sleep(0.3)
        text = _metrics(metrics)
        after = _drops(text)
        grown = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert _received(text) - received >= n
        assert sum(after.values()) - sum(before.values()) == n, grown
        assert {"malformed", "not_a_probe", "unknown_connection_id",
                "probe_unknown_session"} <= set(grown), grown
    finally:
        assert procs.stop(conn, grace=10) != -signal.SIGKILL, "the Connector ignored SIGTERM"
        assert inter.stop() == 0
