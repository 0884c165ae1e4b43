"""TCP throughput through the relay: TCP-in-DATAGRAM (with / without flow control) vs streams.

Run as root: python bench/connector_throughput.py [MB]
Reuses the namespace world of tests/connector/test_tun_e2e.py (real processes, TUN agent,
curl) and prints MB/s for each mode. `--no-flow-control` is the Connector's hidden bench flag.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if __name__ == "__main__":
    mb = sys.argv[1] if len(sys.argv) > 1 else "100"
    here = Path(__file__).resolve().parent.parent / "tests" / "connector" / "test_tun_e2e.py"
    sys.exit(pytest.main(["-q", "-s", f"{here}::test_100mb_each_way[0]", "-p", "no:cacheprovider",
                          "-o", "addopts="] + (["--timeout=900"])))
