"""The stream-resume table's rules (docs/protocol.md §5.1), pure: no connections, no clock.

The Connector's stream table (``ztna.connector.streams``) keeps resumable flows in two maps:
``resumable`` (token -> flow) and ``per_agent`` (agent id -> how many tokens it holds). The
functions here are every change and check made on them:

* ``admit`` gives a flow a token unless its agent already holds ``limit`` of them or the
  token is taken (then the stream is simply not resumable);
* ``release`` takes a token back (single use: a resume releases it before anything else);
* ``owner_may_resume`` is the ownership check: a resume through the relay must name the
  agent id the token was issued to, one on a direct connection must come from that agent id
  *and* the same certificate fingerprint, and the service must match;
* ``retained_tail`` turns the stream's unacknowledged tail (offsets on the QUIC stream,
  which begins with our status reply of ``base`` bytes) into payload offsets, and
  ``resend_from`` picks what to send again from the Agent's received count, or None when
  that count lies outside what we kept (the resume is refused).
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["admit", "owner_may_resume", "release", "resend_from", "retained_tail"]

F = TypeVar("F")


def admit(resumable: dict[bytes, F], per_agent: dict[int, int], token: bytes, flow: F,
          agent_id: int, *, limit: int, token_len: int) -> bool:
    if per_agent.get(agent_id, 0) >= limit:
        return False
    if len(token) != token_len or token in resumable:
        return False
    resumable[token] = flow
    per_agent[agent_id] = per_agent.get(agent_id, 0) + 1
    return True


def release(resumable: dict[bytes, F], per_agent: dict[int, int], token: bytes,
            agent_id: int) -> F | None:
    flow = resumable.pop(token, None)
    if flow is None:
        return None
    n = per_agent.get(agent_id, 0) - 1
    if n > 0:
        per_agent[agent_id] = n
    else:
        per_agent.pop(agent_id, None)
    return flow


def owner_may_resume(owner: tuple[int, str], service_id: str, *, relayed: bool,
                     claimed_agent: int | None, fingerprint: str | None,
                     wanted_service: str) -> bool:
    """`owner` = (agent id, certificate fingerprint) the token was issued to. Relayed: the
    Intermediate vouches for `claimed_agent`; direct: the connection's agent id and
    certificate fingerprint."""
    if service_id != wanted_service or claimed_agent != owner[0]:
        return False
    return relayed or (fingerprint is not None and fingerprint == owner[1])


def retained_tail(unacked: tuple[int, bytes] | None, *, tx: int, base: int) -> tuple[int, bytes]:
    """(payload offset, bytes) the Agent may still lack. `unacked` is the stream's (offset,
    bytes) tail (None: nothing kept, everything up to `tx` payload bytes was delivered);
    payload byte p sits at stream offset `base` + p."""
    offset, data = unacked if unacked is not None else (tx + base, b"")
    if offset < base:              # the status/token itself was not acknowledged
        data, offset = data[base - offset:], base
    return offset - base, data


def resend_from(retained: tuple[int, bytes], received: int) -> bytes | None:
    """What to send again to an Agent that has `received` payload bytes; None when that
    count lies outside what we retained (then the stream cannot be continued)."""
    start, data = retained
    if not start <= received <= start + len(data):
        return None
    return data[received - start:]
