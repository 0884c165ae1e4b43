"""Property tests: encode then decode gives the same message, for every wire message type."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from wire_strategies import (  # tests/wire is on sys.path (pytest rootdir-less import)
    U32,
    control_messages,
    ip_packets,
    keys,
    observed,
    probes,
    registrations,
    service_ids,
    stream_headers,
)

from ztna.wire import (
    ControlDecoder,
    decode_control_frame,
    decode_from_connector,
    decode_probe,
    decode_qad,
    decode_qad_body,
    decode_registration,
    decode_service_datagram,
    decode_stream_header,
    decode_to_connector,
    encode_control,
    encode_from_connector,
    encode_probe,
    encode_qad,
    encode_qad_body,
    encode_registration,
    encode_service_datagram,
    encode_stream_open,
    encode_to_connector,
    probe_session_of,
    to_connector_from_service_datagram,
)


@settings(deadline=None)  # no wall-clock limits in tests
@given(observed)
def test_qad(addr: Any) -> None:
    data = encode_qad(addr)
    assert len(data) in (8, 20)
    assert decode_qad(data) == addr
    assert decode_qad_body(encode_qad_body(addr)) == addr


@settings(deadline=None)  # no wall-clock limits in tests
@given(registrations)
def test_registration(msg: Any) -> None:
    assert decode_registration(encode_registration(msg)) == msg


@settings(deadline=None)  # no wall-clock limits in tests
@given(service_ids, ip_packets)
def test_service_datagram(sid: str, pkt: bytes) -> None:
    data = encode_service_datagram(sid, pkt)
    assert len(data) == 2 + len(sid) + len(pkt)
    got_sid, got_pkt = decode_service_datagram(data)
    assert (got_sid, bytes(got_pkt)) == (sid, pkt)


@settings(deadline=None)  # no wall-clock limits in tests
@given(U32, service_ids, ip_packets)
def test_to_connector(agent: int, sid: str, pkt: bytes) -> None:
    data = encode_to_connector(agent, sid, pkt)
    assert len(data) == 7 + len(sid) + len(pkt)
    got = decode_to_connector(data)
    assert (got[0], got[1], bytes(got[2])) == (agent, sid, pkt)
    # The relay's one-prepend conversion gives the same bytes, from bytes or a memoryview.
    dgram = encode_service_datagram(sid, pkt)
    assert to_connector_from_service_datagram(agent, dgram) == data
    assert to_connector_from_service_datagram(agent, memoryview(dgram)) == data


@settings(deadline=None)  # no wall-clock limits in tests
@given(U32, ip_packets)
def test_from_connector(agent: int, pkt: bytes) -> None:
    data = encode_from_connector(agent, pkt)
    assert len(data) == 6 + len(pkt)
    got_agent, got_pkt = decode_from_connector(data)
    assert (got_agent, bytes(got_pkt)) == (agent, pkt)


@settings(deadline=None)  # no wall-clock limits in tests
@given(control_messages)
def test_control_frame(msg: Any) -> None:
    frame = encode_control(msg)
    assert int.from_bytes(frame[:2], "big") == len(frame) - 2
    assert decode_control_frame(frame) == msg


@settings(deadline=None)  # no wall-clock limits in tests
@given(st.lists(control_messages, max_size=5), st.data())
def test_control_decoder_any_split(msgs: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_control(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec = ControlDecoder()
    got: list[Any] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += dec.feed(stream[prev:cut])
        prev = cut
    assert got == msgs
    assert dec.buffered == 0


@settings(deadline=None)  # no wall-clock limits in tests
@given(stream_headers, st.binary(max_size=20))
def test_stream_header(header: Any, payload: bytes) -> None:
    data = encode_stream_open(header)
    assert len(data) <= 89
    assert decode_stream_header(data + payload) == (header, len(data))
    assert decode_stream_header(data[:-1]) is None


@settings(deadline=None)  # no wall-clock limits in tests
@given(probes, keys)
def test_probe(msg: Any, key: bytes) -> None:
    data = encode_probe(msg, key)
    assert len(data) in (39, 45, 57)
    assert data[0] < 0x40  # never looks like QUIC (fixed bit 0x40)
    assert decode_probe(data, key) == msg
    assert probe_session_of(data) == msg.session
