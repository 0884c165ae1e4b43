"""ztna.link: what the Agent's and the Connector's links to the Intermediate share.

Both programs keep one client connection to the Intermediate alive: resolve, connect,
Hello and Register, then upkeep, and back off after a failure. Today this package holds
the link's states (``LinkState``), which both the Agent's session
(``ztna.agent.session``) and the Connector's relay link (``ztna.connector.relay_link``)
report in their status and logs, and their one reconnect policy (``Backoff``).
"""

from ztna.link.backoff import AGENT_JITTER, EQUAL_JITTER, Backoff
from ztna.link.state import LinkState

__all__ = ["AGENT_JITTER", "EQUAL_JITTER", "Backoff", "LinkState"]
