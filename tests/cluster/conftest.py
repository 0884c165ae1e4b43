"""The two-member cluster most cluster tests start: a Redis and two Intermediates joined to it
(each test module gives its own `pki`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import IntermediateProc, RedisProc, member


@pytest.fixture
def cluster(pki: Path, tmp_path: Path) -> Iterator[tuple[IntermediateProc, IntermediateProc]]:
    redis = RedisProc(tmp_path / "redis").start()
    i1 = member(pki, redis, tmp_path / "i1.log").start()
    i2 = member(pki, redis, tmp_path / "i2.log").start()
    yield i1, i2
    for p in (i1, i2):
        assert p.stop() == 0, p.log()
    redis.kill()
