"""Hypothesis strategies for every ztna.wire message (shared by the wire property tests)."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from ztna.wire import (
    AgentGone,
    Candidate,
    ErrorMessage,
    GoAway,
    NackStatus,
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
    RelayedStreamOpen,
    Role,
    ServiceHealth,
    ServiceStatus,
    StreamOpen,
    UnknownMessage,
)

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
PORT = st.integers(0, 65535)
PORT1 = st.integers(1, 65535)

_ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
service_ids = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "_-", max_size=62),
)
ips = st.one_of(
    st.builds(lambda n: str(ipaddress.IPv4Address(n)), U32),
    st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1)),
)
ip_packets = st.builds(
    lambda first, rest: bytes((first,)) + rest,
    st.one_of(st.integers(0x45, 0x4F), st.integers(0x60, 0x6F)),
    st.binary(max_size=1400),
)
txids = st.binary(min_size=12, max_size=12)
keys = st.binary(min_size=32, max_size=32)

observed = st.builds(ObservedAddress, ips, PORT)
registrations = st.one_of(
    st.builds(Register, st.sampled_from(Role), service_ids),
    st.builds(RegistrationAck, service_ids),
    st.builds(RegistrationNack, st.one_of(st.just(""), service_ids), st.sampled_from(NackStatus)),
)
candidates = st.builds(
    Candidate,
    st.sampled_from(["host", "srflx", "prflx", "relay"]),
    ips,
    PORT1,
    U32,
    st.text(min_size=1, max_size=32),
)
cand_lists = st.lists(candidates, max_size=16).map(tuple)
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64),
                          st.text(max_size=20))
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=10,
)
_KNOWN = {"error", "goaway", "agent_gone", "service_status", "service_health", "ping", "pong", "punch_request",
          "punch_offer", "punch_answer", "punch_start", "punch_result"}
json_messages = st.one_of(
    st.builds(ErrorMessage, st.text(min_size=1, max_size=30), st.text(max_size=100),
              st.one_of(st.none(), U64)),
    st.builds(GoAway, st.text(max_size=50)),
    st.builds(AgentGone, U32),
    st.builds(ServiceStatus, service_ids, st.booleans()),
    st.builds(ServiceStatus, service_ids, st.booleans(), st.text(max_size=40), st.booleans()),
    st.builds(ServiceHealth, service_ids, st.booleans(), st.one_of(st.none(), st.text(max_size=60))),
    st.builds(Ping, U64),
    st.builds(Pong, U64),
    st.builds(PunchRequest, service_ids, cand_lists),
    st.builds(PunchOffer, U64, U32, service_ids, cand_lists),
    st.builds(PunchAnswer, U64, cand_lists),
    st.builds(PunchStart, U64, service_ids, st.sampled_from(["controlling", "controlled"]),
              keys.map(bytes.hex), cand_lists, U32),
    st.one_of(
        st.builds(PunchResult, U64, st.booleans()),
        st.builds(PunchResult, U64, st.booleans(), ips, PORT1),
    ),
    st.builds(
        UnknownMessage,
        st.text(max_size=20).filter(lambda t: t not in _KNOWN),
        st.dictionaries(st.text(max_size=10).filter(lambda k: k not in ("v", "type")),
                        _json_values, max_size=5),
    ),
)
control_messages = st.one_of(observed, registrations, json_messages)
stream_headers = st.one_of(
    st.builds(StreamOpen, service_ids, ips, PORT1),
    st.builds(RelayedStreamOpen, U32, service_ids, ips, PORT1),
)
probes = st.one_of(
    st.builds(ProbeRequest, U64, txids, st.booleans(), st.booleans()),
    st.builds(ProbeResponse, U64, txids, ips, PORT),
)
