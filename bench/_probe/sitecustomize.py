"""tracemalloc probe loaded into every ztna process that bench/datapath.py starts.

bench/datapath.py puts this directory on PYTHONPATH and sets ZTNA_PROBE_DIR; nothing else
ever imports it. SIGUSR1 starts tracemalloc and takes a first snapshot; SIGUSR2 takes the
second, writes the diff (net live blocks/bytes, top lines) to ZTNA_PROBE_DIR/<pid>.json and
stops tracing. The harness divides by the TUN packets forwarded in between.

tracemalloc sees the Python heap only: buffers inside the native QUIC core (ztna._native)
are not counted. (The aioquic-era pacer A/B patch that lived here went with aioquic; it is
in this file at commit 4dde96d.)
"""

import json
import os
import signal
import sys

if os.environ.get("ZTNA_PROBE_DIR"):
    import tracemalloc

    _state: dict = {}

    def _start(*_a: object) -> None:
        tracemalloc.start(4)
        _state["snap"] = tracemalloc.take_snapshot()
        _state["blocks0"] = sys.getallocatedblocks()

    def _stop(*_a: object) -> None:
        if "snap" not in _state:
            return
        snap = tracemalloc.take_snapshot()
        filt = [tracemalloc.Filter(False, tracemalloc.__file__)]
        diff = snap.filter_traces(filt).compare_to(_state.pop("snap").filter_traces(filt), "lineno")
        out = {
            "pid": os.getpid(),
            "argv": sys.argv[:3],
            "count_diff": sum(d.count_diff for d in diff),
            "size_diff": sum(d.size_diff for d in diff),
            "allocated_blocks_delta": sys.getallocatedblocks() - _state.pop("blocks0"),
            "top": [{"where": str(d.traceback[0]), "count_diff": d.count_diff,
                     "size_diff": d.size_diff} for d in diff[:8]],
        }
        tracemalloc.stop()
        path = os.path.join(os.environ["ZTNA_PROBE_DIR"], f"{os.getpid()}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(out, fh)
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, _start)
    signal.signal(signal.SIGUSR2, _stop)
