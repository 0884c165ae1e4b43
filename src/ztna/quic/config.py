"""QUIC configuration shared by all three programs.

One place builds every `QuicConfiguration`, so the Intermediate, the Connector and the Agent
agree on ALPN, CID length, idle timeout, DATAGRAM support and packet size
(issue 2: "one definition of these limits shared by all three programs").
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from aioquic.quic.configuration import QuicConfiguration

from ztna import limits


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


def _datagram_frame_limit(is_client: bool, udp_payload: int) -> int:
    """The max_datagram_frame_size we advertise. A server advertises what fits one packet of
    its OWN size, so a client configured with a larger UDP payload learns (via
    `ZtnaConnection.max_datagram_payload`) that it must not send DATAGRAMs the server could
    never relay onwards (measured: client 1452 / server 1350 otherwise lost every max-size
    datagram to the relay's oversize drop). +1 because aioquic rejects a frame whose size
    *equals* the limit (`>=`), one stricter than RFC 9221."""
    if is_client:
        return 65536
    payload = limits.max_datagram_payload(udp_payload, limits.CONNECTION_ID_LENGTH)
    return payload + limits.DATAGRAM_FRAME_OVERHEAD + 1


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
    store); servers request client certificates (see `ztna.quic.connection`)."""
    if not limits.MIN_QUIC_UDP_PAYLOAD <= udp_payload <= limits.MAX_QUIC_UDP_PAYLOAD:
        from ztna.errors import UsageError

        raise UsageError(
            f"udp payload {udp_payload} outside {limits.MIN_QUIC_UDP_PAYLOAD}.."
            f"{limits.MAX_QUIC_UDP_PAYLOAD}"
        )
    config = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[limits.ALPN],
        connection_id_length=limits.CONNECTION_ID_LENGTH,
        idle_timeout=idle_timeout,
        max_datagram_frame_size=_datagram_frame_limit(is_client, udp_payload),
        max_datagram_size=udp_payload,
        server_name=server_name,
        congestion_control_algorithm="cubic",
        max_data=16 * 1024 * 1024,
        max_stream_data=1024 * 1024,
    )
    if tls.cert is not None and tls.key is not None:
        config.load_cert_chain(str(tls.cert), str(tls.key))
    if is_client:
        config.load_verify_locations(cafile=str(tls.ca))
        config.verify_mode = ssl.CERT_REQUIRED if verify_server else ssl.CERT_NONE
    if keylog_path:
        config.secrets_log_file = open(keylog_path, "a")  # noqa: SIM115 - lives with the process
    if qlog_dir:
        from aioquic.quic.logger import QuicFileLogger

        config.quic_logger = QuicFileLogger(qlog_dir)
    return config
