"""Open one TCP-carrying QUIC stream through the Intermediate and measure it.

Usage: python -m ztna.worlds.stream_client HOST PORT PKI SERVICE VIP VPORT (upload BYTES | get PATH)
Prints "STATUS <n> BYTES <n> SHA256 <hex> SECONDS <s>" for what came back after the status
byte (get: the HTTP response body; upload: the sink's reply).
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from pathlib import Path

from ztna.wire import StreamOpen, encode_stream_open
from ztna.worlds.agent_client import AgentClient


async def main() -> None:
    host, port, pki, service, vip, vport, mode, arg = sys.argv[1:9]
    a = await AgentClient().connect((host, int(port)), Path(pki), [service])
    await a.wait_registered([service])
    conn = a.conn
    assert conn is not None
    sid = conn.open_stream()
    t0 = time.monotonic()
    conn.send_stream(sid, encode_stream_open(StreamOpen(service, vip, int(vport))))
    if mode == "get":
        conn.send_stream(sid, f"GET {arg} HTTP/1.0\r\nHost: x\r\n\r\n".encode(), end=True)
    else:
        total, chunk = int(arg), bytes(range(256)) * 256
        sent = 0
        while sent < total:
            while conn.stream_send_backlog(sid) > 2 * 1024 * 1024:
                await asyncio.sleep(0.002)
            n = min(len(chunk), total - sent)
            conn.send_stream(sid, chunk[:n])
            sent += n
        conn.send_stream(sid, b"", end=True)
    ev = a.stream_fin.setdefault(sid, asyncio.Event())
    await asyncio.wait_for(ev.wait(), 600)
    dt = time.monotonic() - t0
    data = bytes(a.streams.get(sid, b""))
    status, body = data[0], data[1:]
    if mode == "get":
        body = body.split(b"\r\n\r\n", 1)[1]
    if mode != "get":
        print(f"REPLY {body.decode(errors='replace').strip()}", flush=True)
    print(f"STATUS {status} BYTES {len(body)} SHA256 {hashlib.sha256(body).hexdigest()} "
          f"SECONDS {dt:.2f}", flush=True)
    a.close()


if __name__ == "__main__":
    asyncio.run(main())
