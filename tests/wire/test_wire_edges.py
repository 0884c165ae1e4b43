"""Specific edge cases of the wire codecs, each checked against real bytes."""

from __future__ import annotations

import pytest

from ztna.errors import DecodeError, UsageError
from ztna.limits import CONTROL_FRAME_MAX
from ztna.wire import (
    ANY_STREAM_HEADER_MAX,
    Candidate,
    ControlDecoder,
    DatagramKind,
    ErrorMessage,
    NackStatus,
    NamedStreamOpen,
    ObservedAddress,
    Ping,
    ProbeAuthError,
    ProbeRequest,
    ProbeResponse,
    PunchResult,
    PunchStart,
    Register,
    RegistrationNack,
    RelayedNamedStreamOpen,
    RelayedStreamOpen,
    Role,
    StreamOpen,
    StreamStatus,
    UnknownMessage,
    classify_datagram,
    decode_control_frame,
    decode_from_connector,
    decode_json_body,
    decode_probe,
    decode_qad,
    decode_registration,
    decode_service_datagram,
    decode_service_id,
    decode_stream_header,
    decode_stream_status,
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
    to_connector_from_service_datagram,
    validate_service_id,
)
from ztna.wire import service_id as service_id_module

PKT = bytes.fromhex("45000020123440004011b9f3644000010a6400019c40270f000cef0f70696e67")
KEY = bytes(range(1, 33))
TXID = bytes(range(12))


# ---- service ids ------------------------------------------------------------------------

@pytest.mark.parametrize("sid", ["a", "echo-service", "A_b-9", "x" * 63, "0"])
def test_valid_service_ids(sid: str) -> None:
    assert validate_service_id(sid) == sid
    assert decode_service_id(sid.encode()) == sid


@pytest.mark.parametrize("sid", ["", "x" * 64, "-a", "_a", "a b", "a.b", "é", "a\n", "ａ"])
def test_invalid_service_ids(sid: str) -> None:
    with pytest.raises(UsageError):
        validate_service_id(sid)
    with pytest.raises(DecodeError):
        decode_service_id(sid.encode("utf-8"))


def test_service_id_cache_is_bounded_and_hit() -> None:
    for i in range(3000):
        decode_service_id(f"svc{i}".encode())
    assert len(service_id_module._cache) <= 1024
    decode_service_id(b"hot-id")
    assert service_id_module._cache[b"hot-id"] == "hot-id"
    # An invalid id is never cached.
    with pytest.raises(DecodeError):
        decode_service_id(b"bad id")
    assert b"bad id" not in service_id_module._cache


# ---- QAD --------------------------------------------------------------------------------

def test_observed_address_normalises_mapped_ipv6() -> None:
    addr = ObservedAddress("::ffff:203.0.113.5", 1)
    assert addr.ip == "203.0.113.5"
    assert encode_qad(addr) == bytes.fromhex("0104cb0071050001")
    assert ObservedAddress("2001:DB8:0:0::1", 2).ip == "2001:db8::1"


@pytest.mark.parametrize("ip,port", [("1.2.3.4", -1), ("1.2.3.4", 65536), ("1.2.3", 1),
                                     ("fe80::1%eth0", 1), ("1.2.3.4", True), (None, 1)])
def test_observed_address_rejects(ip: object, port: object) -> None:
    with pytest.raises(UsageError):
        ObservedAddress(ip, port)  # type: ignore[arg-type]


def test_qad_truncated_and_trailing() -> None:
    good = encode_qad(ObservedAddress("2001:db8::1", 443))
    for cut in range(len(good)):
        with pytest.raises(DecodeError):
            decode_qad(good[:cut])
    with pytest.raises(DecodeError):
        decode_qad(good + b"\x00")


# ---- registration -----------------------------------------------------------------------

def test_registration_edges() -> None:
    good = encode_registration(Register(Role.CONNECTOR, "echo-service"))
    with pytest.raises(DecodeError):
        decode_registration(good + b"x")
    with pytest.raises(DecodeError):
        decode_registration(good[:-1])
    with pytest.raises(DecodeError):  # invalid UTF-8 in the id
        decode_registration(b"\x10\x02\xff\xfe")
    with pytest.raises(DecodeError):  # empty id only in NACK
        decode_registration(b"\x12\x00\x00")
    assert decode_registration(b"\x13\x05\x00") == RegistrationNack("", NackStatus.SHUTTING_DOWN)
    assert RegistrationNack("a", 3).status is NackStatus.SERVICE_CONFLICT  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        RegistrationNack("a", 9)  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        Register("agent", "a")  # type: ignore[arg-type]


# ---- tunnel datagrams -------------------------------------------------------------------

def test_decoders_return_zero_copy_views() -> None:
    data = bytearray(encode_service_datagram("svc", PKT))
    _, pkt = decode_service_datagram(data)
    assert pkt.obj is data and bytes(pkt) == PKT
    data30 = encode_to_connector(7, "svc", PKT)
    assert decode_to_connector(data30)[2].obj is data30
    data31 = encode_from_connector(7, PKT)
    assert decode_from_connector(data31)[1].obj is data31


def test_tunnel_overheads_match_the_doc() -> None:
    sid = "x" * 63
    assert len(encode_service_datagram(sid, PKT)) - len(PKT) == 2 + 63
    assert len(encode_to_connector(1, sid, PKT)) - len(PKT) == 7 + 63
    assert len(encode_from_connector(1, PKT)) - len(PKT) == 6


def test_tunnel_versions_and_truncation() -> None:
    d30 = bytearray(encode_to_connector(7, "svc", PKT))
    d31 = bytearray(encode_from_connector(7, PKT))
    for bad in (0, 2, 255):
        d30[1] = d31[1] = bad
        with pytest.raises(DecodeError, match="version"):
            decode_to_connector(d30)
        with pytest.raises(DecodeError, match="version"):
            decode_from_connector(d31)
    good = encode_to_connector(7, "svc", PKT)
    for cut in range(7 + 3 + 1):
        with pytest.raises(DecodeError):
            decode_to_connector(good[:cut])
    assert decode_to_connector(good[: 7 + 3 + 1])[2].tobytes() == b"\x45"


def test_to_connector_conversion_is_one_prepend() -> None:
    dgram = encode_service_datagram("echo-service", PKT)
    out = to_connector_from_service_datagram(0xDEADBEEF, dgram)
    assert out == b"\x30\x01\xde\xad\xbe\xef" + dgram[1:]
    with pytest.raises(UsageError):
        to_connector_from_service_datagram(2**32, dgram)


def test_packets_must_look_like_ip() -> None:
    for first in (0x00, 0x01, 0x12, 0x2F, 0x44, 0x50, 0x5F, 0x70, 0xFF):
        with pytest.raises(DecodeError):
            decode_from_connector(b"\x31\x01\x00\x00\x00\x07" + bytes((first,)) + PKT[1:])
        with pytest.raises(UsageError):
            encode_from_connector(7, bytes((first,)) + PKT[1:])
    with pytest.raises(UsageError):
        encode_service_datagram("svc", b"")
    with pytest.raises(UsageError):
        encode_service_datagram("bad id", PKT)


def test_classify_datagram_table() -> None:
    assert classify_datagram(0x01) is DatagramKind.QAD
    assert {classify_datagram(b) for b in (0x10, 0x11, 0x12, 0x13)} == {DatagramKind.REGISTRATION}
    assert classify_datagram(0x2F) is DatagramKind.SERVICE
    assert classify_datagram(0x30) is DatagramKind.TO_CONNECTOR
    assert classify_datagram(0x31) is DatagramKind.FROM_CONNECTOR
    assert classify_datagram(0x44) is DatagramKind.UNKNOWN
    assert {classify_datagram(b) for b in range(0x45, 0x50)} == {DatagramKind.IPV4}
    assert {classify_datagram(b) for b in range(0x60, 0x70)} == {DatagramKind.IPV6}
    assert classify_datagram(0x70) is DatagramKind.UNKNOWN
    # No message type collides with the first byte of an IP packet.
    ip = {DatagramKind.IPV4, DatagramKind.IPV6}
    for b in (0x01, 0x10, 0x11, 0x12, 0x13, 0x2F, 0x30, 0x31):
        assert classify_datagram(b) not in ip


# ---- control stream ---------------------------------------------------------------------

def test_control_decoder_rejects_bad_length_early_and_stays_failed() -> None:
    dec = ControlDecoder()
    assert dec.feed(b"\x00") == []
    with pytest.raises(DecodeError):
        dec.feed(b"\x00")  # length 0, seen before any body
    assert dec.failed and dec.buffered == 0
    with pytest.raises(DecodeError):
        dec.feed(encode_control(Ping(1)))
    over = (CONTROL_FRAME_MAX + 1).to_bytes(2, "big")
    with pytest.raises(DecodeError):
        ControlDecoder().feed(over)


def test_control_decoder_max_frame_and_buffer_bound() -> None:
    head = b'{"type":"x","v":1,"pad":"'
    body = head + b"a" * (CONTROL_FRAME_MAX - 1 - len(head) - 2) + b'"}'
    frame = (1 + len(body)).to_bytes(2, "big") + b"\x20" + body
    assert len(frame) == 2 + CONTROL_FRAME_MAX
    dec = ControlDecoder()
    assert dec.feed(frame[:-1]) == []
    assert dec.buffered == len(frame) - 1
    (msg,) = dec.feed(frame[-1:])
    assert isinstance(msg, UnknownMessage) and msg.type == "x"
    with pytest.raises(UsageError):
        encode_control(ErrorMessage("c", "m" * CONTROL_FRAME_MAX))


def test_control_frame_exact_length() -> None:
    frame = encode_control(Ping(5))
    assert decode_control_frame(frame) == Ping(5)
    with pytest.raises(DecodeError):
        decode_control_frame(frame + b"\x00")
    with pytest.raises(DecodeError):
        decode_control_frame(frame[:-1])


@pytest.mark.parametrize("body", [
    b'{"type":"ping","v":1,"id":1,"id":2}',        # duplicate key
    b'{"type":"ping","v":1,"id":NaN}',             # NaN
    b'{"type":"ping","v":true,"id":1}',            # v is a bool, not 1
    b'{"type":"ping","v":1.0,"id":1}',             # v is a float
    b'{"type":"ping","v":1,"id":true}',            # bool is not an int
    b'{"type":"ping","v":1,"id":-1}',              # out of range
    b'{"type":"ping","v":1,"id":18446744073709551616}',
    b'{"type":"agent_gone","v":1,"agent":4294967296}',
    b'{"type":5,"v":1}',
    b'["ping"]',
    b'\xff{}',
    b'{"type":"service_status","v":1,"service":"bad id","up":true}',
    b'{"type":"punch_result","v":1,"session":1,"ok":true,"ip":"1.2.3.4"}',
    b'{"type":"punch_request","v":1,"service":"s","candidates":[{"kind":"bogus","ip":"1.2.3.4",'
    b'"port":1,"priority":1,"foundation":"f"}]}',
    b'{"type":"punch_request","v":1,"service":"s","candidates":{}}',
    b'{"type":"punch_start","v":1,"session":1,"service":"s","role":"controlling","key":"AB",'
    b'"peer_candidates":[],"start_in_ms":0}',
    b'[' * 5000 + b']' * 5000,
])
def test_json_strictness(body: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_json_body(body)


def test_json_leniency() -> None:
    # Extra keys ignored; optional fields may be null; raw UTF-8 accepted.
    assert decode_json_body(b'{"type":"ping","v":1,"id":3,"future":[1]}') == Ping(3)
    assert decode_json_body(
        b'{"type":"error","v":1,"code":"c","message":"\xc3\xa9","session":null}'
    ) == ErrorMessage("c", "\u00e9")
    assert encode_control(ErrorMessage("c", "\u00e9")).endswith(b'"message":"\\u00e9","type":"error","v":1}')
    assert PunchResult(1, True, "::ffff:1.2.3.4", 5).ip == "1.2.3.4"


def test_message_constructors_validate() -> None:
    with pytest.raises(UsageError):
        Candidate("host", "1.2.3.4", 0, 1, "f")
    with pytest.raises(UsageError):
        Candidate("host", "1.2.3.4", 1, 2**32, "f")
    with pytest.raises(UsageError):
        PunchStart(1, "s", "leader", "00" * 32, (), 0)
    with pytest.raises(UsageError):
        UnknownMessage("ping", {})
    with pytest.raises(UsageError):
        UnknownMessage("x", {"v": 2})
    with pytest.raises(UsageError):
        Ping(2**64)


# ---- stream headers ---------------------------------------------------------------------

def test_stream_header_longest_is_89_bytes() -> None:
    h = RelayedStreamOpen(2**32 - 1, "x" * 63, "ffff::1", 65535)
    data = encode_stream_open(h)
    assert len(data) == 89
    assert decode_stream_header(data) == (h, 89)
    assert decode_stream_header(data[:88]) is None


def test_named_stream_header_longest_is_326_bytes() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61])
    h = RelayedNamedStreamOpen(2**32 - 1, "x" * 63, name, 65535)
    data = encode_stream_open(h)
    assert len(data) == 326 == ANY_STREAM_HEADER_MAX
    assert decode_stream_header(data + b"tail") == (h, 326)
    assert decode_stream_header(data[:325]) is None
    with pytest.raises(UsageError):
        NamedStreamOpen("svc", "App.corp.test", 80)       # not canonical: the caller's bug
    with pytest.raises(UsageError):
        NamedStreamOpen("svc", "10.0.0.1", 80)            # an address is not a name
    with pytest.raises(DecodeError):                       # a name byte that is not ASCII
        decode_stream_header(b"\x58\x01\x01s\x02\xc3\xa9\x00\x50")


def test_stream_header_fails_fast() -> None:
    with pytest.raises(DecodeError):
        decode_stream_header(b"\x5b")     # past the named headers (0x58-0x5A)
    with pytest.raises(DecodeError):
        decode_stream_header(b"\x53\x01\x00")  # empty id
    with pytest.raises(DecodeError):
        decode_stream_header(b"\x53\x01\x40")  # 64-byte id
    assert decode_stream_header(b"") is None
    assert decode_stream_header(b"\x54\x01\x00\x00") is None
    with pytest.raises(UsageError):
        StreamOpen("svc", "1.2.3.4", 0)


def test_stream_status() -> None:
    assert decode_stream_status(0) is StreamStatus.OK
    assert decode_stream_status(5) is StreamStatus.LIMIT
    with pytest.raises(DecodeError):
        decode_stream_status(10)
    assert decode_stream_status(9) is StreamStatus.NAME_UNRESOLVED


# ---- probes -----------------------------------------------------------------------------

def test_probe_mac_mismatch_and_wrong_key() -> None:
    data = bytearray(encode_probe(ProbeRequest(9, TXID, True, False), KEY))
    with pytest.raises(ProbeAuthError):
        decode_probe(data, bytes(32))
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(DecodeError):  # ProbeAuthError or a structural error
            decode_probe(tampered, KEY)
    data[-1] ^= 0xFF
    with pytest.raises(ProbeAuthError):
        decode_probe(data, KEY)


def test_probe_structure_checked_before_mac() -> None:
    good = encode_probe(ProbeResponse(9, TXID, "1.2.3.4", 5), KEY)
    with pytest.raises(DecodeError) as info:
        decode_probe(good + b"\x00", KEY)
    assert not isinstance(info.value, ProbeAuthError)


def test_probe_helpers() -> None:
    data = encode_probe(ProbeResponse(0xABCDEF, TXID, "::ffff:1.2.3.4", 5), KEY)
    assert len(data) == 45  # mapped IPv6 is carried as IPv4
    assert probe_session_of(data) == 0xABCDEF
    assert probe_session_of(data[:9]) is None
    assert probe_session_of(b"\xc0" + data[1:]) is None
    assert is_probe(0x21) and is_probe(0x22)
    assert not any(is_probe(b) for b in range(0x40, 0x100))
    with pytest.raises(UsageError):
        encode_probe(ProbeRequest(1, TXID, True, True), b"short")
    with pytest.raises(UsageError):
        ProbeRequest(1, b"\x00" * 11, True, True)


def test_stream_reply_incremental_and_resume_checks() -> None:
    from ztna.wire import StreamResume, decode_stream_reply, encode_stream_reply
    data = encode_stream_reply(StreamStatus.OK_RESUMABLE, bytes(range(16))) + b"payload"
    for cut in range(17):
        assert decode_stream_reply(data[:cut]) is None
    assert decode_stream_reply(data) == (StreamStatus.OK_RESUMABLE, bytes(range(16)), 17)
    assert decode_stream_reply(b"\x07" + (2**40).to_bytes(8, "big")) == (StreamStatus.RESUMED, 2**40, 9)
    assert decode_stream_reply(b"\x00abc") == (StreamStatus.OK, None, 1)
    with pytest.raises(UsageError):
        encode_stream_reply(StreamStatus.OK_RESUMABLE, b"short")
    with pytest.raises(UsageError):
        encode_stream_reply(StreamStatus.OK, 5)
    with pytest.raises(UsageError):
        StreamResume("web", bytes(15), 0)
    with pytest.raises(UsageError):
        StreamResume("web", bytes(16), -1)


def test_mesh_signal_carries_only_punch_messages() -> None:
    """A mesh signal nests one punch message (its own v/type) and nothing else: not an offer,
    not another mesh signal, not an unknown type; and a bad inner message fails the frame."""
    import json

    from ztna.errors import DecodeError, UsageError
    from ztna.wire import MeshSignal, Ping, PunchResult, decode_control_frame, encode_control

    ok = MeshSignal(agent=9, message=PunchResult(session=5, ok=True, ip="192.0.2.1", port=4434))
    assert decode_control_frame(encode_control(ok)) == ok
    with pytest.raises(UsageError):
        MeshSignal(agent=9, message=Ping(id=1))  # type: ignore[arg-type]

    def frame(body: dict[str, object]) -> bytes:
        raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        return (len(raw) + 1).to_bytes(2, "big") + b"\x20" + raw

    inner_ok = {"v": 1, "type": "punch_result", "session": 5, "ok": False}
    for message in ({"v": 1, "type": "mesh_signal", "agent": 1, "message": inner_ok},
                    {"v": 1, "type": "config_sync", "ttl": 3},
                    {"v": 2, "type": "punch_result", "session": 5, "ok": False},
                    {"v": 1, "type": "punch_result", "session": -1, "ok": False},
                    "punch_result"):
        with pytest.raises(DecodeError):
            decode_control_frame(frame({"v": 1, "type": "mesh_signal", "agent": 1, "message": message}))
    with pytest.raises(DecodeError):
        decode_control_frame(frame({"v": 1, "type": "mesh_signal", "agent": 2**32, "message": inner_ok}))


def test_deeply_nested_mesh_signals_fail_cleanly() -> None:
    from ztna.errors import DecodeError
    from ztna.wire import decode_control_frame

    body = b'{"v":1,"type":"punch_result","session":1,"ok":false}'
    while len(body) < 16000:
        body = b'{"agent":1,"message":' + body + b',"type":"mesh_signal","v":1}'
    with pytest.raises(DecodeError):
        decode_control_frame((len(body) + 1).to_bytes(2, "big") + b"\x20" + body)
