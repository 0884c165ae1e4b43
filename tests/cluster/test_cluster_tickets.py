"""Two `ztna intermediate --cluster` processes sharing a real redis-server on loopback: shared
keys give 0-RTT on the member that did not issue the ticket, a ticket spent on one member is
refused on the other, and a Redis restart in the middle of a session costs 0-RTT, never the
session, until the store is back."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_helpers import Agent, IntermediateProc, Peer, RedisProc, member

from ztna.certs import init_pki
from ztna.netstack.packets import build_udp_packet
from ztna.quic.config import TlsFiles, forget_client_sessions
from ztna.wire import RegistrationAck, Role, encode_service_datagram

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["echo"])
    return d


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProc]:
    proc = RedisProc(tmp_path / "redis").start()
    yield proc
    proc.kill()


@pytest.fixture
def members(pki: Path, redis: RedisProc, tmp_path: Path) -> Iterator[list[IntermediateProc]]:
    procs = [member(pki, redis, tmp_path / f"i{n}.log").start() for n in (1, 2)]
    yield procs
    for p in procs:
        assert p.stop() == 0, p.log()


@pytest.fixture(autouse=True)
def fresh_client_sessions() -> Iterator[None]:
    forget_client_sessions()
    yield
    forget_client_sessions()


def healthz(proc: IntermediateProc) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/healthz", timeout=2) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def resumptions(proc: IntermediateProc) -> float:
    return proc.metrics().get("ztna_zero_rtt_resumptions_total", 0.0)


async def echo_once(agent: Agent, payload: bytes) -> bytes:
    """One UDP packet through the relay to the echoing Connector and back: the bytes."""
    assert agent.conn is not None
    before = len(agent.datagrams)
    packet = build_udp_packet(bytes([10, 1, 2, 3]), bytes([10, 9, 9, 9]), 4000, 9999, payload)
    agent.conn.send_datagram(encode_service_datagram("echo", packet))
    for _ in range(300):
        if len(agent.datagrams) > before:
            return agent.datagrams[-1][28:]     # the echoed packet's UDP payload
        await asyncio.sleep(0.01)
    raise TimeoutError("no echo")


def test_shared_keys_give_0rtt_on_the_other_member(pki: Path, members: list[IntermediateProc]) -> None:
    i1, i2 = members

    async def main() -> None:
        first = await Agent(pki).connect(i1.port)
        assert first.conn is not None and not first.conn.resumed
        await first.close()
        # The ticket came from I1; I2 has never seen this client.
        again = await Agent(pki).connect(i2.port)
        assert again.conn is not None
        assert again.conn.resumed and again.conn.early_data_accepted
        await again.close()

    asyncio.run(main())
    assert resumptions(i1) == 0 and resumptions(i2) == 1
    m2 = i2.metrics()
    # I1's NEW_TOKEN validated on I2 (the shared address-token key): no Retry round trip.
    assert m2.get("ztna_quic_retry_sent_total", 0) == 0
    assert m2.get("ztna_quic_address_tokens_validated_total", 0) >= 1
    assert m2["ztna_cluster_store_up"] == 1
    cluster = healthz(i2)["cluster"]
    assert isinstance(cluster, dict) and cluster["store_up"] is True
    assert cluster["member"] == f"127.0.0.1:{i2.port}"


def test_ticket_spent_on_one_member_is_refused_on_the_other(
        pki: Path, members: list[IntermediateProc]) -> None:
    i1, i2 = members

    async def main() -> None:
        first = await Agent(pki).connect(i1.port)
        await first.close()
        # Resume on I1 through a hop that records the first flight (ClientHello with the
        # ticket + the Register in 0-RTT), as an attacker on the path could.
        spent = await Agent(pki).connect(i1.port, via_hop=True)
        assert spent.conn is not None and spent.conn.early_data_accepted
        assert spent.hop is not None
        flight = list(spent.hop.first_flight)
        assert flight
        await spent.close()
        registrations = i2.metrics().get("ztna_registrations_total", 0)
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(3):
            for datagram in flight:
                attacker.sendto(datagram, ("127.0.0.1", i2.port))
            await asyncio.sleep(0.1)
        attacker.close()
        await asyncio.sleep(0.5)
        m2 = i2.metrics()
        assert m2.get("ztna_registrations_total", 0) == registrations   # no effect
        assert resumptions(i2) == 0
        # I2 asked the store for the ticket and found it spent.
        assert m2.get('ztna_session_tickets_refused_total{reason="unknown"}', 0) >= 1, m2

    asyncio.run(main())
    assert resumptions(i1) == 1


def test_redis_restart_in_the_middle_of_a_session(
        pki: Path, redis: RedisProc, members: list[IntermediateProc]) -> None:
    i1, i2 = members

    async def main() -> None:
        connector = await Peer(echo=True).connect("127.0.0.1", i1.port, TlsFiles.from_dir(pki, "connector"))
        assert isinstance(await connector.register(Role.CONNECTOR, "echo"), RegistrationAck)
        held = await Agent(pki).connect(i1.port)
        assert await echo_once(held, b"before the outage") == b"before the outage"

        redis.kill()
        # The held session keeps working, byte for byte, while the store is gone.
        for n in range(5):
            payload = f"during the outage {n}".encode()
            assert await echo_once(held, payload) == payload
        # A returning client is served with a full handshake: 0-RTT refused, not risked.
        other = Agent(pki, "agent")
        await other.connect(i2.port)
        assert other.conn is not None and not other.conn.early_data_accepted
        await other.close()
        await asyncio.sleep(1.5)             # the probes notice the outage too
        for proc in (i1, i2):
            cluster = healthz(proc)["cluster"]
            assert isinstance(cluster, dict) and cluster["store_up"] is False, cluster
            assert proc.metrics()["ztna_cluster_store_up"] == 0
        refused = i2.metrics().get('ztna_session_tickets_refused_total{reason="store_down"}', 0)
        assert refused >= 1
        assert healthz(i2)["ok"] is True     # degraded, still serving

        redis.start()                        # empty: no persistence
        for _ in range(50):
            if all(healthz(p)["cluster"]["store_up"] for p in (i1, i2)):  # type: ignore[index]
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("members did not notice the store came back")
        # The keys were written back, so tokens and tickets work across members again.
        assert b"ztna:key:address-token" in redis.command("KEYS", "ztna:key:*")
        assert await echo_once(held, b"after the outage") == b"after the outage"
        fresh = await Agent(pki).connect(i1.port)   # a full handshake: new tickets, stored
        await fresh.close()
        back = await Agent(pki).connect(i2.port)
        assert back.conn is not None and back.conn.resumed and back.conn.early_data_accepted
        await back.close()
        await held.close()
        await connector.close()

    asyncio.run(main())
    for proc in (i1, i2):
        text = proc.log()
        # Logged once per member, each way.
        assert text.count("unreachable") == 1, text
        assert text.count("answers again") == 1, text
    assert i2.metrics()["ztna_cluster_store_outages_total"] == 1


def test_a_stalled_redis_costs_0rtt_not_the_handshake(
        pki: Path, redis: RedisProc, members: list[IntermediateProc]) -> None:
    """Redis alive but not answering (SIGSTOP): the first ticket lookup gives up after its
    tight timeout, the client gets a full handshake at once, and 0-RTT comes back after
    SIGCONT without a restart."""
    import signal

    i1, i2 = members

    async def main() -> None:
        first = await Agent(pki).connect(i1.port)
        await first.close()
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGSTOP)
        try:
            # Well under the 10 s the connect allows: the lookup waits 0.1 s, not for Redis.
            stalled = await asyncio.wait_for(Agent(pki).connect(i2.port), 5)
            assert stalled.conn is not None and not stalled.conn.early_data_accepted
            await stalled.close()
            assert i2.metrics()['ztna_session_tickets_refused_total{reason="store_down"}'] >= 1
        finally:
            redis.proc.send_signal(signal.SIGCONT)
        for _ in range(100):
            if healthz(i1)["cluster"]["store_up"] and healthz(i2)["cluster"]["store_up"]:  # type: ignore[index]
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("members did not notice the store answers again")
        fresh = await Agent(pki).connect(i1.port)
        await fresh.close()
        back = await Agent(pki).connect(i2.port)
        assert back.conn is not None and back.conn.early_data_accepted
        await back.close()

    asyncio.run(main())
