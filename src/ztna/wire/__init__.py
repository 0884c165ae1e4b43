"""ztna.wire: every byte on the wire, as pure codecs (docs/protocol.md is the contract).

Modules, one per wire family:

* `service_id`      the service id rule (validate / decode with a bounded cache)
* `qad`             0x01 QUIC Address Discovery
* `registration`    0x10-0x13 register / ACK / NACK
* `tunnel`          0x2F / 0x30 / 0x31 tunnel DATAGRAMs and the first-byte classifier
* `control`         control stream framing (stream 0) and `ControlDecoder`
* `control_messages` the JSON (0x20) control messages
* `stream_header`   headers of TCP-carrying streams and the Connector's status byte
* `probe`           authenticated P2P connectivity-check probes (raw UDP)

All decoders accept bytes, bytearray or memoryview and raise only `ztna.errors.DecodeError`
on any input bytes; encoders and message constructors raise `ztna.errors.UsageError`. No
module here does I/O or reads clocks or randomness (tests/test_pure_imports.py checks this).
"""

from ztna.wire.control import *  # noqa: F403
from ztna.wire.control import __all__ as _control_all
from ztna.wire.control_messages import *  # noqa: F403
from ztna.wire.control_messages import __all__ as _control_messages_all
from ztna.wire.mesh import *  # noqa: F403
from ztna.wire.mesh import __all__ as _mesh_all
from ztna.wire.probe import *  # noqa: F403
from ztna.wire.probe import __all__ as _probe_all
from ztna.wire.qad import *  # noqa: F403
from ztna.wire.qad import __all__ as _qad_all
from ztna.wire.registration import *  # noqa: F403
from ztna.wire.registration import __all__ as _registration_all
from ztna.wire.service_id import *  # noqa: F403
from ztna.wire.service_id import __all__ as _service_id_all
from ztna.wire.stream_header import *  # noqa: F403
from ztna.wire.stream_header import __all__ as _stream_header_all
from ztna.wire.tunnel import *  # noqa: F403
from ztna.wire.tunnel import __all__ as _tunnel_all

__all__ = sorted(
    set(_control_all) | set(_control_messages_all) | set(_mesh_all) | set(_probe_all) | set(_qad_all)
    | set(_registration_all) | set(_service_id_all) | set(_stream_header_all) | set(_tunnel_all)
)
