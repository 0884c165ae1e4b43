"""TCP backend for upload tests: reads until EOF, answers the sha256 hex and byte count."""

import hashlib
import socket
import sys
import threading


def serve(conn: socket.socket) -> None:
    h, n = hashlib.sha256(), 0
    while True:
        data = conn.recv(1 << 20)
        if not data:
            break
        h.update(data)
        n += len(data)
    conn.sendall(f"{h.hexdigest()} {n}\n".encode())
    conn.close()


s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
