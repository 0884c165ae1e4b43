"""The admission policy and the address-token codec, in memory (no sockets, no clock)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztna.quic.admission import (
    AddressTokenCodec,
    AdmissionPolicy,
    Decision,
    Reason,
    SourceRateLimiter,
    Verdict,
)
from ztna.quic.tokens import AddressTokens

KEY = bytes(range(16))
NONCE = bytes(12)


def _policy(*, retry: bool = True, max_connections: int = 10, rate: float = 2.0) -> AdmissionPolicy:
    return AdmissionPolicy(retry=retry, max_connections=max_connections,
                           limiter=SourceRateLimiter(rate))


def test_the_order_of_decisions() -> None:
    p = _policy(max_connections=1)
    assert p.decide(source="192.0.2.1", validated=True, may_retry=True, open_connections=1,
                    now=0.0) == Decision(Verdict.REFUSE, Reason.CONNECTION_LIMIT)
    p = _policy()
    assert p.decide(source="192.0.2.1", validated=False, may_retry=True, open_connections=0,
                    now=0.0) == Decision(Verdict.RETRY, Reason.NEW_ADDRESS)
    # a Retry costs no budget: both handshakes of the burst are still there
    for _ in range(2):
        d = p.decide(source="192.0.2.1", validated=True, may_retry=False, open_connections=0, now=0.0)
        assert d == Decision(Verdict.ACCEPT, Reason.RETRY_VALIDATED, Reason.RETRY_VALIDATED)
    d = p.decide(source="192.0.2.1", validated=True, may_retry=True, open_connections=0, now=0.0)
    assert d == Decision(Verdict.IGNORE, Reason.RATE_LIMITED, Reason.TOKEN_VALIDATED)
    # another source has its own budget
    d = p.decide(source="192.0.2.2", validated=True, may_retry=True, open_connections=0, now=0.0)
    assert d == Decision(Verdict.ACCEPT, Reason.TOKEN_VALIDATED, Reason.TOKEN_VALIDATED)


def test_without_retry_unvalidated_attempts_are_accepted() -> None:
    p = _policy(retry=False)
    d = p.decide(source="2001:db8::1", validated=False, may_retry=True, open_connections=0, now=0.0)
    assert d == Decision(Verdict.ACCEPT, Reason.UNVALIDATED, Reason.UNVALIDATED)
    # an attempt that may not be retried (already answered a Retry) is not retried again
    p = _policy()
    d = p.decide(source="2001:db8::1", validated=False, may_retry=False, open_connections=0, now=0.0)
    assert d.verdict is Verdict.ACCEPT


def test_the_bucket_refills_at_its_rate() -> None:
    lim = SourceRateLimiter(2.0)
    assert [lim.allow("a", now=0.0) for _ in range(3)] == [True, True, False]
    assert lim.allow("a", now=0.4) is False      # 0.8 tokens: not yet
    assert lim.allow("a", now=0.5) is True       # 1.0 token after 0.5 s at 2/s
    assert lim.allow("a", now=100.0) and lim.allow("a", now=100.0)
    assert lim.allow("a", now=100.0) is False    # the burst is capped at the rate


def test_the_source_table_is_bounded() -> None:
    lim = SourceRateLimiter(1.0, max_sources=8)
    for i in range(9):
        assert lim.allow(f"s{i}", now=0.0)
    assert len(lim.buckets) == 9 - 8 // 4
    assert "s0" not in lim.buckets and "s8" in lim.buckets   # the oldest went first
    for i in range(100):
        lim.allow(f"t{i}", now=0.0)
    assert len(lim.buckets) <= 8


def test_tokens_are_bound_to_the_ip_and_expire() -> None:
    codec = AddressTokenCodec(KEY, lifetime=60.0)
    token = codec.issue("192.0.2.7", wall_now=1000.0, nonce=NONCE)
    assert token[0] == 0xA7 and token[1:13] == NONCE
    assert codec.issue("192.0.2.7", wall_now=1000.0, nonce=NONCE) == token   # deterministic
    assert codec.validate(token, "192.0.2.7", wall_now=1000.0)
    assert codec.validate(token, "::ffff:192.0.2.7", wall_now=1059.0)       # mapped = same IP
    assert not codec.validate(token, "192.0.2.8", wall_now=1000.0)
    assert not codec.validate(token, "192.0.2.7", wall_now=1060.5)          # expired
    assert not codec.validate(token, "192.0.2.7", wall_now=999.0)           # from the future
    tampered = token[:-1] + bytes([token[-1] ^ 1])
    assert not codec.validate(tampered, "192.0.2.7", wall_now=1000.0)
    assert not codec.validate(b"\xa7" + bytes(20), "192.0.2.7", wall_now=1000.0)
    assert not AddressTokenCodec(bytes(16), lifetime=60).validate(token, "192.0.2.7", wall_now=1000.0)
    six = codec.issue("2001:db8::1%eth0", wall_now=5.0, nonce=NONCE)
    assert codec.validate(six, "2001:db8::1", wall_now=5.0)
    with pytest.raises(ValueError):
        codec.issue("192.0.2.7", wall_now=0.0, nonce=b"short")


def test_address_tokens_take_their_clock_and_nonces_from_outside(tmp_path: Path) -> None:
    clock = [1000.0]
    nonces = iter([b"\x01" * 12, b"\x02" * 12])
    tokens = AddressTokens(KEY, lifetime=10.0, wall_clock=lambda: clock[0],
                           rng=lambda n: next(nonces)[:n])
    first = tokens.issue("198.51.100.1")
    assert first[1:13] == b"\x01" * 12
    assert first == AddressTokenCodec(KEY, lifetime=10.0).issue("198.51.100.1", wall_now=1000.0,
                                                                nonce=b"\x01" * 12)
    assert tokens.validate(first, "198.51.100.1")
    clock[0] = 1011.0
    assert not tokens.validate(first, "198.51.100.1")
    assert tokens.issue("198.51.100.1")[1:13] == b"\x02" * 12
    # the key survives a restart through the state directory
    a = AddressTokens.from_state_dir(tmp_path)
    b = AddressTokens.from_state_dir(tmp_path)
    assert a.key == b.key and (tmp_path / "address-token.key").stat().st_mode & 0o777 == 0o600
