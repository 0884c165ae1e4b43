"""ztna.bench: ``ztna bench`` — ztna side by side with nebula, wireguard-go and sshuttle.

One run builds the project's namespace lab (``ztna.lab``), runs each path as a row
(``runner.ROWS``: baselines, ztna direct/relay, nebula direct/relay, wireguard-go,
sshuttle), measures iperf3 TCP throughput both ways plus TCP/UDP echo latency from the
Agent node to the app behind the Connector, and reports a Markdown table with ztna's
ratio to each peer, JSON and a PNG (``report``). Peer tools are never installed at run
time: a missing tool turns its row into "not installed (apt-get install ...)".
See docs/benchmarks.md.

This is the installed benchmark (``ztna bench``); the top-level ``bench/`` folder of a
checkout holds the separate one-question scripts (data path, relay hot path, carriage,
P2P warm-up), described in ``bench/README.md``.
"""
