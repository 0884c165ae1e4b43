"""ztna.link: what the Agent's and the Connector's links to the Intermediate share.

Both programs keep one client connection to the Intermediate alive: resolve, connect,
Hello and Register, then upkeep, and back off after a failure, moving on to the next of
several Intermediates. The Agent's session (``ztna.agent.session``) and the Connector's
relay link (``ztna.connector.relay_link``) are thin program-specific adapters over:

* ``state``: the link's states (``LinkState``), shown in status and logs;
* ``backoff``: the one reconnect policy (``Backoff``);
* ``registration``: the one registration state machine, paced per program
  (``RegistrationPolicy``);
* ``targets``: the list of Intermediates and which one is used now;
* ``driver``: the I/O half (resolve, connect with Hello, send due Registers, the
  connect / back off / fail over loop, and the link's events such as ``moved``).

All but ``driver`` are pure; this module imports only those.
"""

from ztna.link.backoff import AGENT_JITTER, EQUAL_JITTER, Backoff
from ztna.link.state import LinkState

__all__ = ["AGENT_JITTER", "EQUAL_JITTER", "Backoff", "LinkState"]
