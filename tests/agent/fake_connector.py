"""Test peer run inside a namespace: a real Intermediate plus an in-process fake Connector.

The fake Connector registers for the given services and answers, through the Intermediate,
every UDP packet with the same payload and swapped addresses/ports, and every ICMP echo with
an echo reply. It writes the Intermediate's UDP port to PORTFILE once ready.

    python fake_connector.py PKI_DIR PORTFILE SERVICE [SERVICE...]
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from ztna.intermediate.server import Intermediate, IntermediateOptions
from ztna.netstack.packets import (
    PROTO_UDP,
    build_icmp_echo_reply,
    build_udp_packet,
    parse_ip,
    parse_udp,
)
from ztna.quic.config import TlsFiles, make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.wire import Register, Role, decode_to_connector, encode_control, encode_from_connector


class Echo(ConnectionHandler):
    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        if data[0] != 0x30:
            return
        agent, _service, packet = decode_to_connector(data)
        ip = parse_ip(packet)
        if ip.proto == PROTO_UDP:
            udp = parse_udp(packet, ip)
            reply = build_udp_packet(ip.dst, ip.src, udp.dport, udp.sport, bytes(udp.payload))
        else:
            reply = build_icmp_echo_reply(packet)
            if reply is None:
                return
        conn.send_datagram(encode_from_connector(agent, reply))


async def main(pki: str, portfile: str, services: list[str]) -> None:
    srv = Intermediate(IntermediateOptions(tls=TlsFiles.from_dir(pki, "intermediate"),
                                           listen=[("127.0.0.1", 0)], metrics=None))
    await srv.start()
    ep = QuicEndpoint(bind_udp("127.0.0.1", 0))
    cfg = make_configuration(is_client=True, tls=TlsFiles.from_dir(pki, "connector"), server_name="localhost")
    conn = ep.connect(("127.0.0.1", srv.ports[0]), cfg, Echo())
    await conn.wait_handshake()
    for s in services:
        conn.send_control(encode_control(Register(role=Role.CONNECTOR, service_id=s)))
    await asyncio.sleep(0.2)
    Path(portfile).write_text(str(srv.ports[0]))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
