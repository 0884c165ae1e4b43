"""QUIC Address Discovery: the Intermediate tells each peer the address it sees it from.

Sent when a peer is accepted and again whenever its address changes (NAT rebinding), twice:
as DATAGRAM 0x01 (fast, may be lost or too large for the peer's limit) and as a control
message (reliable). The peer's P2P code uses it as its server-reflexive candidate.

Pure: the reply is computed from the address alone; `send_qad` only calls the connection.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from ztna.errors import DatagramTooLarge
from ztna.wire import ObservedAddress, encode_control, encode_qad


class QadReply(NamedTuple):
    address: ObservedAddress
    datagram: bytes     # DATAGRAM 0x01
    control: bytes      # the same address as a control frame


def observed_address(peer_address: tuple[Any, ...]) -> ObservedAddress:
    """The address as the peer should read it: no zone id, IPv4-mapped IPv6 as IPv4."""
    return ObservedAddress(ip=str(peer_address[0]).split("%")[0], port=int(peer_address[1]))


def qad_reply(peer_address: tuple[Any, ...]) -> QadReply:
    addr = observed_address(peer_address)
    return QadReply(addr, encode_qad(addr), encode_control(addr))


class QadPeer(Protocol):
    @property
    def peer_address(self) -> tuple[Any, ...]: ...
    def send_datagram(self, data: bytes) -> object: ...
    def send_control(self, frame: bytes) -> None: ...


def send_qad(conn: QadPeer) -> None:
    reply = qad_reply(conn.peer_address)
    try:
        conn.send_datagram(reply.datagram)
    except DatagramTooLarge:
        pass    # the control message carries it
    conn.send_control(reply.control)
