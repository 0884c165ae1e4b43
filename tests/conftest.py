"""Shared fixtures: the `root` marker and the namespace lab (`lab_factory`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ztna.lab.config import unique_prefix

__all__ = ["unique_prefix"]


def _lab_capable() -> str | None:
    """None when namespace tests can run here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "needs `ip netns`"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("ZTNA_SLOW") != "1":
        skip_slow = pytest.mark.skip(reason="slow test: set ZTNA_SLOW=1 to run it")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    reason = _lab_capable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"root-marked test: {reason}")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Any]]:
    """``make(**LabConfig kwargs) -> Lab`` (already up, unique prefix); all downed at teardown."""
    from ztna.lab import Lab, LabConfig

    labs: list[Lab] = []

    def make(**kwargs: Any) -> Lab:
        kwargs.setdefault("prefix", unique_prefix())
        lab = Lab(LabConfig(**kwargs))
        labs.append(lab)
        return lab.up()

    yield make
    errors = []
    for lab in labs:
        try:
            lab.down()
        except Exception as exc:  # keep downing the others
            errors.append(exc)
    if errors:
        raise errors[0]
