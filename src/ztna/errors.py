"""The two error families (docs/architecture.md, "Errors").

* `ProtocolError` — bad input from a peer. Decoders raise only this (or its subclass
  `DecodeError`); drivers turn it into a counted, rate-limited drop and keep serving.
* `UsageError` — a bug or bad argument in *our* code or configuration; raised, never sent.
"""


class ZtnaError(Exception):
    """Base class of every ztna error."""


class ProtocolError(ZtnaError):
    """A peer sent something we cannot accept. Never fatal to a server."""


class DecodeError(ProtocolError):
    """Bytes that do not decode to a valid message."""


class UsageError(ZtnaError):
    """The caller (our own code or the operator's config) did something invalid."""


class DatagramTooLarge(UsageError):
    """A DATAGRAM payload larger than the live connection can carry (never enqueued)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"DATAGRAM payload of {size} bytes exceeds the live maximum of {limit}")
        self.size = size
        self.limit = limit


def error_text(exc: BaseException | None, timeout: str = "timeout") -> str:
    """A never-empty text for a log line or a status: `str(exc)`, or for the exceptions
    that carry no message (asyncio's TimeoutError, a bare ConnectionError) what happened.
    (`exc or "timeout"` does not work: an exception object is always true.)"""
    if exc is None:
        return timeout
    text = str(exc).strip()
    if text:
        return text
    if isinstance(exc, TimeoutError):
        return timeout
    return type(exc).__name__
