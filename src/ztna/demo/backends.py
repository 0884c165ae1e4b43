"""The demo's private apps: an HTTP file server and a UDP echo server in one process.

    python -m ztna.demo.backends --host 127.0.0.1 --root DIR --ready-file PATH

Both bind port 0 (or ``--http-port`` / ``--udp-port``); once both sockets are bound the
chosen ports are written as JSON to ``--ready-file`` (atomically, via rename), which is
the readiness signal the demo waits on. Runs until SIGTERM/SIGINT. The HTTP server is
``http.server``'s threaded server serving ``--root`` (one thread per connection, so a
slow download does not block the readiness probe); the echo server answers every
datagram with the same bytes. A third socket is the apps' private DNS (UDP, dnspython):
every name under ``apps.demo`` is the HTTP server's address (A or AAAA as the host is),
anything else NXDOMAIN; the Connector resolves the apps reached by name with it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import socket
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        sys.stderr.write("backend http: " + (format % args) + "\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, host: str, port: int, root: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), functools.partial(_QuietHandler, directory=root))


def _echo(sock: socket.socket) -> None:
    while True:
        try:
            data, addr = sock.recvfrom(65535)
            sock.sendto(data, addr)
        except OSError:
            return


DNS_ZONE = "apps.demo"


def _dns(sock: socket.socket, host: str) -> None:
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    want = dns.rdatatype.AAAA if ":" in host else dns.rdatatype.A
    while True:
        try:
            data, addr = sock.recvfrom(4096)
        except OSError:
            return
        try:
            query = dns.message.from_wire(data)
            q = query.question[0]
        except Exception:  # noqa: BLE001 - anything undecodable is ignored
            continue
        reply = dns.message.make_response(query)
        name = q.name.to_text(omit_final_dot=True).lower()
        if not name.endswith("." + DNS_ZONE):
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif q.rdtype == want:
            reply.answer.append(dns.rrset.from_text(q.name, 5, "IN", want, host))
        sock.sendto(reply.to_wire(), addr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ztna.demo.backends")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--udp-port", type=int, default=0)
    ap.add_argument("--root", required=True)
    ap.add_argument("--ready-file", required=True)
    args = ap.parse_args(argv)

    http = _Server(args.host, args.http_port, args.root)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    udp.bind((args.host, args.udp_port))
    threading.Thread(target=_echo, args=(udp,), daemon=True, name="udp-echo").start()
    dns_sock = socket.socket(family, socket.SOCK_DGRAM)
    dns_sock.bind((args.host, 0))
    threading.Thread(target=_dns, args=(dns_sock, args.host), daemon=True, name="dns").start()

    ports = {"http": http.server_address[1], "udp": udp.getsockname()[1], "dns": dns_sock.getsockname()[1],
             "pid": os.getpid()}
    tmp = args.ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ports, f)
    os.replace(tmp, args.ready_file)
    sys.stderr.write(f"backends: http {args.host}:{ports['http']} "
                     f"udp echo {args.host}:{ports['udp']}\n")
    sys.stderr.flush()

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=http.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    http.serve_forever(poll_interval=0.2)
    udp.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
