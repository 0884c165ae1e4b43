"""The states of a program's link to the Intermediate (shown as their values in status JSON
and log lines, so the values are part of the status output)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["LinkState"]


class LinkState(StrEnum):
    STARTING = "starting"          # built, not started yet
    CONNECTING = "connecting"      # resolving the Intermediate's name or in the handshake
    CONNECTED = "connected"        # handshake done (the Agent: and the Intermediate answered)
    DISCONNECTED = "disconnected"  # the connection closed; a reconnect follows
    BACKOFF = "backoff"            # waiting before the next attempt after a failure
    STOPPING = "stopping"          # shutting down (GoAway sent)
    STOPPED = "stopped"
