"""QUIC configuration shared by all three programs.

One place builds every configuration, so the Intermediate, the Connector and the Agent agree
on ALPN, connection-ID length, idle timeout, DATAGRAM support and packet size. The native
objects it produces (`ztna._native.ClientTls`, `ServerTls`) hold rustls and quinn settings.

A client's native configuration is kept per identity for the life of the process: it holds
the session tickets and address tokens its connections received, so a reconnect to the same
server resumes in 0-RTT without a Retry. Tickets are single use and never leave memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ztna import _native, limits

log = logging.getLogger("ztna.quic")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Certificate, key and CA paths for one side of a connection."""

    cert: Path | None   # None: a client that presents no certificate (tests of refusal)
    key: Path | None
    ca: Path

    @classmethod
    def from_dir(cls, directory: str | Path, name: str) -> TlsFiles:
        d = Path(directory)
        return cls(cert=d / f"{name}.pem", key=d / f"{name}.key", ca=d / "ca.pem")


def _read(path: Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def _stamp(path: Path | None) -> tuple[str, int] | None:
    if path is None:
        return None
    try:
        st = Path(path).stat()
    except OSError:
        return (str(path), 0)
    return (str(path), st.st_mtime_ns ^ st.st_size)


# Native client configurations by everything that shapes them (files by path + mtime, so a
# reloaded certificate gets a fresh one).
_CLIENT_TLS: dict[tuple[object, ...], _native.ClientTls] = {}


def forget_client_sessions() -> None:
    """Drop every client configuration with its tickets and tokens (tests, certificate reload)."""
    _CLIENT_TLS.clear()


@dataclass
class QuicConfiguration:
    is_client: bool
    tls: TlsFiles
    server_name: str | None = None
    udp_payload: int = limits.DEFAULT_QUIC_UDP_PAYLOAD
    idle_timeout: float = limits.IDLE_TIMEOUT
    keylog_path: str | None = None
    verify_server: bool = True
    alpn_protocols: list[str] = field(default_factory=lambda: [limits.ALPN])
    datagram_queue: int = limits.DATAGRAM_QUEUE_LIMIT
    resumption: bool = True        # keep session tickets and resume (0-RTT)
    # Set by QuicEndpoint.connect: True when this connection attempt carries 0-RTT data.
    session_ticket: bool | None = None
    # Kept for callers that still hand an address token over; the native client presents
    # the NEW_TOKEN tokens the server gave it instead.
    token: bytes = b""

    def _client_key(self) -> tuple[object, ...]:
        tls = self.tls
        return (
            _stamp(tls.cert), _stamp(tls.key), _stamp(tls.ca), tuple(self.alpn_protocols),
            self.verify_server, self.keylog_path, self.udp_payload, self.idle_timeout,
            self.datagram_queue, self.resumption,
        )

    def forget_sessions(self) -> None:
        """Drop the tickets and address tokens this configuration's connections collected
        (the next connection is a first one: Retry and a full handshake)."""
        _CLIENT_TLS.pop(self._client_key(), None)

    def client_tls(self) -> _native.ClientTls:
        tls = self.tls
        key = self._client_key()
        native = _CLIENT_TLS.get(key)
        if native is None:
            native = _native.ClientTls(
                ca_pem=Path(tls.ca).read_bytes(), cert_pem=_read(tls.cert), key_pem=_read(tls.key),
                alpn=list(self.alpn_protocols), verify_server=self.verify_server,
                keylog=self.keylog_path, resumption=self.resumption, udp_payload=self.udp_payload,
                idle_timeout=self.idle_timeout, datagram_queue=self.datagram_queue,
            )
            if len(_CLIENT_TLS) > 64:
                _CLIENT_TLS.clear()
            _CLIENT_TLS[key] = native
        return native

    def server_tls(self, *, token_key: bytes, tickets: _native.TicketBackend | None,
                   request_client_cert: bool) -> _native.ServerTls:
        tls = self.tls
        if tls.cert is None or tls.key is None:
            from ztna.errors import UsageError

            raise UsageError("a server needs a certificate and a key")
        return _native.ServerTls(
            cert_pem=Path(tls.cert).read_bytes(), key_pem=Path(tls.key).read_bytes(),
            token_key=token_key, alpn=list(self.alpn_protocols),
            request_client_cert=request_client_cert, tickets=tickets, keylog=self.keylog_path,
            udp_payload=self.udp_payload, idle_timeout=self.idle_timeout,
            datagram_queue=self.datagram_queue,
        )


def make_configuration(
    *,
    is_client: bool,
    tls: TlsFiles,
    server_name: str | None = None,
    udp_payload: int = limits.DEFAULT_QUIC_UDP_PAYLOAD,
    idle_timeout: float = limits.IDLE_TIMEOUT,
    keylog_path: str | None = None,
    qlog_dir: str | None = None,
    verify_server: bool = True,
) -> QuicConfiguration:
    """Build a configuration. Clients verify the server against our CA (never the system
    store) and the name they dial; servers request client certificates, which Python checks
    (`ztna.identity`). Bad certificate or key files raise ValueError/OSError here, at start-up."""
    if not limits.MIN_QUIC_UDP_PAYLOAD <= udp_payload <= limits.MAX_QUIC_UDP_PAYLOAD:
        from ztna.errors import UsageError

        raise UsageError(
            f"udp payload {udp_payload} outside {limits.MIN_QUIC_UDP_PAYLOAD}.."
            f"{limits.MAX_QUIC_UDP_PAYLOAD}"
        )
    if qlog_dir:
        # quinn-proto's qlog output is not built into this core; keylog + metrics replace it.
        log.warning("qlog is not available with the native QUIC core (%s ignored); "
                    "use --keylog with Wireshark instead", qlog_dir)
    config = QuicConfiguration(
        is_client=is_client, tls=tls, server_name=server_name, udp_payload=udp_payload,
        idle_timeout=idle_timeout, keylog_path=keylog_path, verify_server=verify_server,
    )
    if is_client:
        config.client_tls()    # parse the files now: a bad one fails at start-up
    elif tls.cert is not None and tls.key is not None:
        _native.check_identity(cert_pem=Path(tls.cert).read_bytes(), key_pem=Path(tls.key).read_bytes())
    return config
