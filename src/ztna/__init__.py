"""ztna: a Zero Trust Network Access tunnel over QUIC.

Three programs share this package: the Intermediate (public relay), the App Connector
(next to the private apps) and the Agent (on the user's machine). See docs/architecture.md.
"""

__version__ = "0.1.0"
