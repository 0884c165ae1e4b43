"""docs/protocol.md is the contract: decode every hex vector in it, re-encode, compare bytes.

Blocks in the document look like

    vector: <codec>/<name>        (decode, re-encode, byte-exact)
    invalid: <codec>/<name>       (must raise DecodeError)
    decode-only: <codec>/<name>   (decodes to the value in DECODE_ONLY below)

each followed by a fenced ```hex block (whitespace ignored).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ztna.errors import DecodeError
from ztna.wire import (
    AgentGone,
    ControlDecoder,
    ErrorMessage,
    GoAway,
    MeshSignal,
    NackStatus,
    NamedStreamOpen,
    ObservedAddress,
    Ping,
    Pong,
    ProbeRequest,
    ProbeResponse,
    PunchAnswer,
    PunchOffer,
    PunchRequest,
    PunchResult,
    PunchStart,
    Register,
    RegistrationAck,
    RegistrationNack,
    RelayedNamedStreamOpen,
    RelayedStreamOpen,
    RelayedStreamResume,
    Role,
    ServiceHealth,
    ServiceStatus,
    StreamOpen,
    StreamResume,
    UnknownMessage,
    decode_control_frame,
    decode_from_connector,
    decode_mesh_from_connector,
    decode_mesh_to_connector,
    decode_probe,
    decode_qad,
    decode_registration,
    decode_service_datagram,
    decode_stream_header,
    decode_stream_reply,
    decode_to_connector,
    encode_control,
    encode_from_connector,
    encode_mesh_from_connector,
    encode_mesh_to_connector,
    encode_probe,
    encode_qad,
    encode_registration,
    encode_service_datagram,
    encode_stream_open,
    encode_stream_reply,
    encode_to_connector,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
KEY = bytes(range(1, 33))
_BLOCK = re.compile(r"^(vector|invalid|decode-only): (\S+)\n\n```hex\n(.*?)\n```", re.M | re.S)


def _blocks() -> list[tuple[str, str, bytes]]:
    text = DOC.read_text(encoding="utf-8")
    return [(kind, name, bytes.fromhex("".join(hexs.split())))
            for kind, name, hexs in _BLOCK.findall(text)]


BLOCKS = _blocks()


def _decode_reply(data: bytes) -> Any:
    result = decode_stream_reply(data)
    if result is None:
        raise DecodeError("incomplete")
    status, extra, used = result
    if used != len(data):
        raise DecodeError("trailing bytes after the status")
    return status, extra


def _decode_stream(data: bytes) -> Any:
    result = decode_stream_header(data)
    if result is None:
        raise DecodeError("incomplete")  # a vector is always a whole header
    header, consumed = result
    assert consumed == len(data)
    return header


def _decode_service(data: bytes) -> Any:
    sid, pkt = decode_service_datagram(data)
    assert isinstance(pkt, memoryview)
    return sid, bytes(pkt)


def _decode_to(data: bytes) -> Any:
    agent, sid, pkt = decode_to_connector(data)
    assert isinstance(pkt, memoryview)
    return agent, sid, bytes(pkt)


def _decode_from(data: bytes) -> Any:
    agent, pkt = decode_from_connector(data)
    assert isinstance(pkt, memoryview)
    return agent, bytes(pkt)


CODECS: dict[str, tuple[Callable[[bytes], Any], Callable[[Any], bytes]]] = {
    "qad": (decode_qad, encode_qad),
    "registration": (decode_registration, encode_registration),
    "service": (_decode_service, lambda v: encode_service_datagram(*v)),
    "to_connector": (_decode_to, lambda v: encode_to_connector(*v)),
    "from_connector": (_decode_from, lambda v: encode_from_connector(*v)),
    "mesh_to_connector": (lambda d: (lambda r, s, p: (r, s, bytes(p)))(*decode_mesh_to_connector(d)),
                          lambda v: encode_mesh_to_connector(*v)),
    "mesh_from_connector": (lambda d: (lambda r, p: (r, bytes(p)))(*decode_mesh_from_connector(d)),
                            lambda v: encode_mesh_from_connector(*v)),
    "control": (decode_control_frame, encode_control),
    "stream_header": (_decode_stream, encode_stream_open),
    "stream_reply": (_decode_reply, lambda v: encode_stream_reply(*v)),
    "probe": (lambda d: decode_probe(d, KEY), lambda m: encode_probe(m, KEY)),
}

DECODE_ONLY: dict[str, Any] = {
    "qad/v4-mapped": ObservedAddress("203.0.113.5", 54321),
}

# Why each invalid vector must fail (a substring of the DecodeError message), so that a vector
# cannot pass by failing for some other reason.
INVALID_REASONS: dict[str, str] = {
    "qad/bad-version": "unknown address version",
    "qad/trailing-byte": "expected 7",
    "qad/truncated": "expected 7",
    "registration/register-empty-id": "invalid service id",
    "registration/ack-nonzero-status": "status byte",
    "registration/bad-utf8-id": "invalid service id",
    "registration/id-with-space": "invalid service id",
    "registration/nack-unknown-status": "unknown status",
    "registration/length-mismatch": "does not match",
    "service/no-packet": "missing or non-IP",
    "service/not-ip": "missing or non-IP",
    "to_connector/version-2": "unknown version",
    "from_connector/smuggled-qad": "not an IP packet",
    "from_connector/empty-packet": "short",
    "mesh_to_connector/version-2": "unknown version",
    "mesh_to_connector/truncated-id": "missing or non-IP",
    "mesh_from_connector/smuggled-qad": "not an IP packet",
    "control/zero-length": "outside 1..16384",
    "control/too-long": "outside 1..16384",
    "control/unknown-frame-type": "unknown control frame type",
    "control/json-version-2": "unsupported version",
    "control/ping-missing-id": "missing field",
    "control/ping-bool-id": "must be an int",
    "control/service_health-string-healthy": "must be a bool",
    "control/mesh_signal-carries-offer": "cannot carry 'punch_offer'",
    "stream_header/bad-version": "unknown stream header version",
    "stream_header/port-zero": "port 0",
    "stream_header/bad-family": "unknown address family",
    "stream_header/resume-empty-id": "service id length",
    "stream_header/named-upper-case": "not canonical",
    "stream_header/named-empty-name": "name length 0",
    "stream_header/named-bad-label": "empty or over-long label",
    "stream_header/named-port-zero": "port 0",
    "stream_reply/unknown-status": "unknown stream status",
    "probe/bad-mac": "bad mac",
    "probe/unknown-flag": "unknown flags",
}

# Every message type must have at least one vector in the document.
REQUIRED_TYPES = {
    ObservedAddress, Register, RegistrationAck, RegistrationNack, ErrorMessage, GoAway,
    AgentGone, ServiceStatus, ServiceHealth, Ping, Pong, PunchRequest, PunchOffer, PunchAnswer, PunchStart,
    PunchResult, UnknownMessage, StreamOpen, RelayedStreamOpen, StreamResume, RelayedStreamResume, ProbeRequest, ProbeResponse,
    NamedStreamOpen, RelayedNamedStreamOpen, MeshSignal,
}


def _codec(name: str) -> tuple[Callable[[bytes], Any], Callable[[Any], bytes]]:
    return CODECS[name.split("/", 1)[0]]


def test_document_has_vectors() -> None:
    kinds = {kind for kind, _, _ in BLOCKS}
    assert kinds == {"vector", "invalid", "decode-only"}
    names = [name for _, name, _ in BLOCKS]
    assert len(names) == len(set(names)), "duplicate vector names"
    prefixes = {name.split("/", 1)[0] for name in names}
    assert prefixes <= CODECS.keys()
    assert prefixes >= {"service", "to_connector", "from_connector"}
    assert {n for k, n, _ in BLOCKS if k == "invalid"} == INVALID_REASONS.keys()
    assert {n for k, n, _ in BLOCKS if k == "decode-only"} == DECODE_ONLY.keys()


def test_every_message_type_has_a_vector() -> None:
    seen = set()
    for kind, name, data in BLOCKS:
        if kind == "vector":
            value = _codec(name)[0](data)
            seen.add(type(value))
    assert REQUIRED_TYPES <= seen, REQUIRED_TYPES - seen


@pytest.mark.parametrize("name,data", [(n, d) for k, n, d in BLOCKS if k == "vector"],
                         ids=[n for k, n, _ in BLOCKS if k == "vector"])
def test_vector_roundtrip(name: str, data: bytes) -> None:
    decode, encode = _codec(name)
    value = decode(data)
    assert encode(value) == data
    # Decoders accept any buffer type and give the same answer.
    assert decode(bytearray(data)) == value  # type: ignore[arg-type]
    assert decode(memoryview(data)) == value  # type: ignore[arg-type]


@pytest.mark.parametrize("name,data", [(n, d) for k, n, d in BLOCKS if k == "invalid"],
                         ids=[n for k, n, _ in BLOCKS if k == "invalid"])
def test_invalid_vector_rejected(name: str, data: bytes) -> None:
    decode, _ = _codec(name)
    with pytest.raises(DecodeError, match=re.escape(INVALID_REASONS[name])):
        decode(data)
    if name.startswith("control/"):
        with pytest.raises(DecodeError):
            ControlDecoder().feed(data)


@pytest.mark.parametrize("name,data", [(n, d) for k, n, d in BLOCKS if k == "decode-only"],
                         ids=[n for k, n, _ in BLOCKS if k == "decode-only"])
def test_decode_only_vector(name: str, data: bytes) -> None:
    assert _codec(name)[0](data) == DECODE_ONLY[name]


def test_control_vectors_through_incremental_decoder() -> None:
    frames = [(d, decode_control_frame(d)) for k, n, d in BLOCKS
              if k == "vector" and n.startswith("control/")]
    stream = b"".join(d for d, _ in frames)
    expected = [m for _, m in frames]
    assert ControlDecoder().feed(stream) == expected
    dec = ControlDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert got == expected
    assert dec.buffered == 0


def test_stream_header_vectors_need_every_byte() -> None:
    for kind, name, data in BLOCKS:
        if kind == "vector" and name.startswith("stream_header/"):
            for cut in range(len(data)):
                assert decode_stream_header(data[:cut]) is None
            header, consumed = decode_stream_header(data + b"payload")  # type: ignore[misc]
            assert consumed == len(data)


def test_selected_vectors_decode_to_documented_values() -> None:
    by_name = {n: d for k, n, d in BLOCKS if k == "vector"}
    assert decode_qad(by_name["qad/v4"]) == ObservedAddress("203.0.113.5", 54321)
    assert decode_qad(by_name["qad/v6"]) == ObservedAddress("2001:db8::1", 443)
    assert decode_registration(by_name["registration/register-agent"]) == Register(
        Role.AGENT, "echo-service")
    assert decode_registration(by_name["registration/nack-not-authorized"]) == RegistrationNack(
        "echo-service", NackStatus.NOT_AUTHORIZED)
    agent, sid, pkt = decode_to_connector(by_name["to_connector/agent-7"])
    assert (agent, sid, pkt[0]) == (7, "echo-service", 0x45)
    assert decode_from_connector(by_name["from_connector/agent-7"])[0] == 7
    assert decode_control_frame(by_name["control/unknown-type"]) == UnknownMessage(
        "config_sync", {"ttl": 30})
    req = decode_probe(by_name["probe/request-nominate"], KEY)
    assert req == ProbeRequest(0x123456789ABCDEF0, bytes(range(0xA0, 0xAC)), True, True)
    resp = decode_probe(by_name["probe/response-v4"], KEY)
    assert isinstance(resp, ProbeResponse)
    assert (resp.mapped_ip, resp.mapped_port) == ("198.51.100.7", 40000)
    assert _decode_stream(by_name["stream_header/named-open"]) == NamedStreamOpen("corp", "app1.corp.test", 80)
    assert _decode_stream(by_name["stream_header/named-open-resumable"]) == NamedStreamOpen(
        "corp", "git.corp.test", 443, resumable=True)
    assert _decode_stream(by_name["stream_header/relayed-named-open"]) == RelayedNamedStreamOpen(
        7, "corp", "app1.corp.test", 80)
    assert decode_control_frame(by_name["control/mesh_signal-punch_result"]) == MeshSignal(
        7, PunchResult(session=1, ok=False))
    start = decode_control_frame(by_name["control/punch_start"])
    assert isinstance(start, PunchStart) and start.key_bytes == KEY
