"""The header helpers drivers use instead of hand-written arithmetic agree with the codecs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztna.errors import UsageError
from ztna.wire import (
    FROM_CONNECTOR_OVERHEAD,
    encode_from_connector,
    encode_service_datagram,
    encode_to_connector,
    from_connector_prefix,
    service_datagram_overhead,
    service_datagram_prefix,
    to_connector_overhead,
)

PACKET = bytes.fromhex("4500001c00004000401100007f0000017f00000200070007000800")
service_ids = st.from_regex(r"[a-z][a-z0-9-]{0,30}", fullmatch=True)


@given(sid=service_ids)
def test_prefix_and_overheads_match_the_encoders(sid: str) -> None:
    dgram = encode_service_datagram(sid, PACKET)
    assert dgram == service_datagram_prefix(sid) + PACKET
    assert len(dgram) - len(PACKET) == service_datagram_overhead(sid)
    assert len(encode_to_connector(7, sid, PACKET)) - len(PACKET) == to_connector_overhead(sid)


@given(agent=st.integers(min_value=0, max_value=2**32 - 1))
def test_from_connector_prefix(agent: int) -> None:
    prefix = from_connector_prefix(agent)
    assert len(prefix) == FROM_CONNECTOR_OVERHEAD
    assert prefix + PACKET == encode_from_connector(agent, PACKET)


def test_the_0x31_header_bytes() -> None:
    assert from_connector_prefix(0x01020304) == b"\x31\x01\x01\x02\x03\x04"
    assert service_datagram_prefix("web") == b"\x2f\x03web"
    with pytest.raises(UsageError):
        from_connector_prefix(2**32)
    with pytest.raises(UsageError):
        service_datagram_prefix("")
