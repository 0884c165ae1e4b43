"""Totality: arbitrary bytes into every decoder raise DecodeError or decode — nothing else.

Random bytes rarely get past the first checks, so besides pure garbage we also mutate valid
messages (flip, truncate, extend), which reaches the deep branches of each decoder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_strategies import (  # tests/wire is on sys.path (pytest rootdir-less import)
    U32,
    control_messages,
    ip_packets,
    observed,
    probes,
    registrations,
    service_ids,
    stream_headers,
)

from ztna.errors import DecodeError
from ztna.wire import (
    ControlDecoder,
    classify_datagram,
    decode_control_frame,
    decode_from_connector,
    decode_json_body,
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
    encode_registration,
    encode_service_datagram,
    encode_stream_open,
    encode_to_connector,
    is_probe,
    probe_session_of,
)

KEY = bytes(range(1, 33))

DECODERS: dict[str, Callable[[Any], Any]] = {
    "qad": decode_qad,
    "qad_body": decode_qad_body,
    "registration": decode_registration,
    "service": decode_service_datagram,
    "to_connector": decode_to_connector,
    "from_connector": decode_from_connector,
    "control_frame": decode_control_frame,
    "json_body": decode_json_body,
    "stream_header": decode_stream_header,
    "probe": lambda d: decode_probe(d, KEY),
    "probe_session_of": probe_session_of,
}


def _total(decode: Callable[[Any], Any], data: bytes) -> None:
    for form in (data, bytearray(data), memoryview(data)):
        try:
            decode(form)
        except DecodeError:
            pass


def _feed_total(data: bytes) -> None:
    try:
        ControlDecoder().feed(data)
    except DecodeError:
        pass
    dec = ControlDecoder()
    try:
        for i in range(len(data)):
            dec.feed(data[i : i + 1])
    except DecodeError:
        assert dec.failed
        with pytest.raises(DecodeError):
            dec.feed(b"")
    assert dec.buffered <= 2 + 16384


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(deadline=None)  # no wall-clock limits in tests
@given(data=st.binary(max_size=300))
def test_garbage(name: str, data: bytes) -> None:
    _total(DECODERS[name], data)


@settings(deadline=None)  # no wall-clock limits in tests
@given(st.binary(max_size=300))
def test_garbage_control_decoder(data: bytes) -> None:
    _feed_total(data)


def _valid_messages() -> st.SearchStrategy[bytes]:
    return st.one_of(
        observed.map(encode_qad),
        registrations.map(encode_registration),
        st.builds(encode_service_datagram, service_ids, ip_packets),
        st.builds(encode_to_connector, U32, service_ids, ip_packets),
        st.builds(encode_from_connector, U32, ip_packets),
        control_messages.map(encode_control),
        stream_headers.map(encode_stream_open),
        st.builds(encode_probe, probes, st.just(KEY)),
    )


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(_valid_messages()))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "extend", "set"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[draw(st.integers(0, len(data))):]
        else:
            data += draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_mutated_messages(data: bytes) -> None:
    for decode in DECODERS.values():
        _total(decode, data)
    _feed_total(data)


@settings(deadline=None)  # no wall-clock limits in tests
@given(st.binary(max_size=200))
def test_json_garbage_in_valid_frame(body: bytes) -> None:
    frame = (1 + len(body)).to_bytes(2, "big") + b"\x20" + body
    _total(decode_control_frame, frame)
    _feed_total(frame)


@settings(deadline=None)  # no wall-clock limits in tests
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                              st.text(max_size=10)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=6), inner,
                                                            max_size=3)),
                    max_leaves=12),
       st.sampled_from(["error", "goaway", "agent_gone", "service_status", "ping", "pong",
                        "punch_request", "punch_offer", "punch_answer", "punch_start",
                        "punch_result", "other"]),
       st.dictionaries(st.sampled_from(["code", "message", "session", "reason", "agent",
                                        "service", "up", "id", "candidates", "ip", "port",
                                        "role", "key", "peer_candidates", "start_in_ms", "ok"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 2**65), st.text(
                           max_size=5), st.lists(st.dictionaries(st.sampled_from(
                               ["kind", "ip", "port", "priority", "foundation"]),
                               st.one_of(st.integers(-1, 2**33), st.text(max_size=4),
                                         st.just("host"), st.just("1.2.3.4"))), max_size=3)),
                       max_size=8))
def test_wrong_json_fields(extra: Any, msg_type: str, fields: dict[str, Any]) -> None:
    import json
    obj = {**fields, "v": 1, "type": msg_type, "x": extra}
    try:
        body = json.dumps(obj).encode()
    except ValueError:
        return
    _total(decode_json_body, body)


def test_classify_and_is_probe_total() -> None:
    for b in range(-3, 300):
        classify_datagram(b)
        is_probe(b)
