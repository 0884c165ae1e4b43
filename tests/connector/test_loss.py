"""TCP through the relay under loss (root): both carriages, both directions, sha256-exact.

The namespace world of `ztna.worlds.bridge`; `Ns.loss(N)` drops N % of the UDP datagrams to and
from the Intermediate (nftables `numgen random mod 100 < N drop`), so every DATAGRAM
crosses two lossy hops each way. Default run: 5 MB each way through the TUN at 3 % loss
(the Connector's userspace TCP recovers with SACK). ZTNA_SLOW=1 adds 100 MB each way,
TCP-in-DATAGRAM and streams, at 0 % and 3 % loss; times are printed (run with -s).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from ztna.worlds.bridge import Ns, download, start_world, stop_world, stream, upload

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ns]:
    ns = start_world(tmp_path_factory.mktemp("loss"), f"ztl{os.getpid()}")
    try:
        yield ns
    finally:
        stop_world(ns)


def test_5mb_each_way_at_3_percent_loss(world: Ns) -> None:
    world.loss(3)
    try:
        download(world, 5 << 20)
        upload(world, 5 << 20)
    finally:
        world.loss(0)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("loss", [0, 3])
@pytest.mark.parametrize("carriage", ["datagram", "stream"])
def test_100mb_each_way(world: Ns, carriage: str, loss: int) -> None:
    size = 100 << 20
    world.loss(loss)
    try:
        if carriage == "datagram":
            down, up = download(world, size), upload(world, size)
        else:
            down, up = stream(world, "get", size), stream(world, "upload", size)
    finally:
        world.loss(0)
    print(f"\n{carriage} loss {loss}%: down {size / down / 1e6:.2f} MB/s ({down:.1f} s), "
          f"up {size / up / 1e6:.2f} MB/s ({up:.1f} s)")
