"""ICMP / ICMPv6 toward the Agent: echo replies for the virtual IPs, and the useful errors.

* Echo requests are answered only when addressed to one of the service's virtual IPs and the
  service has `icmp = true`; the caller already dropped packets for any other address, so a
  ping to a non-virtual address gets nothing back (like a firewall that drops).
* Errors: port unreachable when a UDP backend refuses (or the virtual port is not offered),
  packet too big / fragmentation needed when an inner packet cannot fit the live DATAGRAM
  size of the path back. Never in answer to an ICMP error or a multicast (RFC 1122/4443).
"""

from __future__ import annotations

from ztna.errors import DecodeError
from ztna.netstack.packets import (
    build_icmp_echo_reply,
    build_icmp_packet_too_big,
    build_icmp_port_unreachable,
    may_send_icmp_error,
)

__all__ = ["echo_reply", "port_unreachable", "packet_too_big"]


def echo_reply(packet: bytes | memoryview) -> bytes | None:
    """The reply to an echo request, or None for anything else (other ICMP types)."""
    return build_icmp_echo_reply(packet)


def port_unreachable(packet: bytes | memoryview, *, src: bytes) -> bytes | None:
    if not may_send_icmp_error(packet):
        return None
    try:
        return build_icmp_port_unreachable(packet, src=src)
    except DecodeError:
        return None


def packet_too_big(packet: bytes | memoryview, *, src: bytes, mtu: int) -> bytes | None:
    if not may_send_icmp_error(packet):
        return None
    try:
        return build_icmp_packet_too_big(packet, src=src, mtu=mtu)
    except DecodeError:
        return None
