"""Interoperability: the Linux kernel's TCP (client) against TcpEndpoint over a TUN device.

Runs in a throw-away network namespace; 1 MiB each way must arrive byte-exact.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import uuid

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                    reason="needs root and /dev/net/tun")
def test_linux_tcp_client_against_endpoint_over_tun() -> None:
    ns = f"ztna-ns-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable,
                               str(HERE / "kernel_tun_peer.py")],
                              capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("OK"), proc.stdout + proc.stderr
