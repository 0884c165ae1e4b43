"""ztna.lab: the project's own network lab in Linux network namespaces (root only).

``Lab(LabConfig(...))`` builds relay / inet / nata / natb / agent / conn / app
namespaces with cone, symmetric or no NAT, IPv4, dual stack or IPv6-only (routed or
NAT66), and optional delay, jitter, loss, rate and NAT mapping lifetime. See
``ztna.lab.config`` for the addressing plan and ``ztna.lab.lab`` for the life cycle.
"""

from ztna.lab.config import NAT_MODES, NODES, LabConfig
from ztna.lab.lab import Lab, teardown

__all__ = ["NAT_MODES", "NODES", "Lab", "LabConfig", "teardown"]
