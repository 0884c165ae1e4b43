"""ztna.demo: the self-contained end-to-end demo behind `ztna demo`.

One run builds throwaway certificates in a temp dir, starts an Intermediate, a Connector
with two backends (an HTTP server for a random file and a UDP echo server) and an Agent as
real child processes, pushes real bytes through the tunnel (HTTP download checked by
sha256, UDP echo checked byte for byte, ping in TUN mode), measures reconnects, and tears
everything down again — also on Ctrl-C or error.

Where things run (``ztna.demo.layouts``):

* ``local`` (no root): everything on 127.0.0.1, Agent in userspace mode (-L / -U forwards).
* ``netns`` (root): two fresh network namespaces joined by a veth: "pub" runs the
  Intermediate, Connector and backends; "agent" runs the Agent with a TUN. The host's own
  interfaces and routes are untouched.
* ``lab`` (root, ``--lab``): the project's namespace lab (``ztna.lab``): Intermediate on
  ``relay``, Connector on ``conn``, backends on ``app``, Agent on ``agent`` behind NATs.

``run_demo(DemoOptions(...), reporter)`` returns the result dict that ``--json`` prints.
"""

from ztna.demo.runner import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]
