"""Real processes in a network namespace (root): Intermediate, Connector, http.server and a
sha256 sink as backends, the TUN Agent bridge, and the kernel's TCP (curl / Python sockets).

The world (`ztna.worlds.bridge`) runs in one fresh namespace on its loopback; the P2P port is
dropped by one global nftables rule for the whole test (relay traffic must not care).
Default run: 8 MB each way. Loss tests (and the 100 MB runs) are in `test_loss.py`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ztna.worlds.bridge import PY, Ns, download, start_world, stop_world, stream, upload

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ns]:
    ns = start_world(tmp_path_factory.mktemp("tun"), f"ztc{os.getpid()}")
    try:
        yield ns
    finally:
        stop_world(ns)


def test_tcp_in_datagram_download_upload_and_udp_ping(world: Ns) -> None:
    download(world, 8 << 20)
    upload(world, 8 << 20)
    # UDP echo reply comes back from the virtual address (connect() filters on source)
    r = world.run(f"{PY} -c \"import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                  "s.settimeout(3); s.connect(('10.100.0.3',7)); s.send(b'hi'); print(s.recv(99))\"")
    assert "b'hi'" in r.stdout, r.stdout + r.stderr
    assert world.run("ping -c1 -W2 10.100.0.2").returncode == 0
    assert world.run("ping -c1 -W1 10.100.0.9").returncode != 0


def test_streams_download_and_upload(world: Ns) -> None:
    stream(world, "get", 8 << 20)
    stream(world, "upload", 8 << 20)
