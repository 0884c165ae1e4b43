"""The Connector's stream-resume table rules (`ztna.connector.resume`), in memory: tokens
per agent, single use, who may resume, and which bytes are sent again."""

from __future__ import annotations

from ztna.connector import resume

LEN = 16
OWNER = (7, "fp-agent-7")


def _tok(n: int) -> bytes:
    return bytes([n]) * LEN


def test_tokens_are_limited_per_agent_unique_and_single_use() -> None:
    table: dict[bytes, str] = {}
    per_agent: dict[int, int] = {}
    assert resume.admit(table, per_agent, _tok(1), "f1", 7, limit=2, token_len=LEN)
    assert resume.admit(table, per_agent, _tok(2), "f2", 7, limit=2, token_len=LEN)
    assert not resume.admit(table, per_agent, _tok(3), "f3", 7, limit=2, token_len=LEN)  # limit
    assert resume.admit(table, per_agent, _tok(3), "f3", 8, limit=2, token_len=LEN)      # other agent
    assert not resume.admit(table, per_agent, _tok(1), "fx", 9, limit=2, token_len=LEN)  # taken
    assert not resume.admit(table, per_agent, b"short", "fx", 9, limit=2, token_len=LEN)
    assert (table, per_agent) == ({_tok(1): "f1", _tok(2): "f2", _tok(3): "f3"}, {7: 2, 8: 1})
    assert resume.release(table, per_agent, _tok(1), 7) == "f1"
    assert resume.release(table, per_agent, _tok(1), 7) is None      # single use
    assert per_agent == {7: 1, 8: 1}
    assert resume.admit(table, per_agent, _tok(4), "f4", 7, limit=2, token_len=LEN)  # room again
    resume.release(table, per_agent, _tok(3), 8)
    assert 8 not in per_agent                                          # no empty counters kept


def test_who_may_resume() -> None:
    def may(*, relayed: bool, agent: int | None, fp: str | None = None, svc: str = "web") -> bool:
        return resume.owner_may_resume(OWNER, "web", relayed=relayed, claimed_agent=agent,
                                       fingerprint=fp, wanted_service=svc)

    assert may(relayed=True, agent=7)                  # the Intermediate vouches for the id
    assert not may(relayed=True, agent=8)
    assert may(relayed=False, agent=7, fp="fp-agent-7")
    assert not may(relayed=False, agent=7, fp="fp-other")   # same id, another certificate
    assert not may(relayed=False, agent=7, fp=None)
    assert not may(relayed=False, agent=None, fp="fp-agent-7")  # no Hello on that connection
    assert not may(relayed=True, agent=7, svc="db")


def test_retained_tail_in_payload_offsets() -> None:
    # The stream starts with an 18-byte status+token reply; payload byte p is at 18 + p.
    assert resume.retained_tail((118, b"abc"), tx=103, base=18) == (100, b"abc")
    # Nothing kept: everything we sent was delivered.
    assert resume.retained_tail(None, tx=50, base=18) == (50, b"")
    # The reply itself was not acknowledged yet: its bytes are not payload.
    assert resume.retained_tail((10, b"R" * 8 + b"payload"), tx=7, base=18) == (0, b"payload")


def test_resend_from_the_agents_count() -> None:
    kept = (100, b"abcdef")
    assert resume.resend_from(kept, 100) == b"abcdef"
    assert resume.resend_from(kept, 103) == b"def"
    assert resume.resend_from(kept, 106) == b""          # it has everything
    assert resume.resend_from(kept, 99) is None          # lacks bytes we no longer have
    assert resume.resend_from(kept, 107) is None         # claims bytes we never sent
