"""TUN mode with --tcp-transport stream, in the namespace lab (root): curl through the
Agent's nftables redirect, one QUIC stream per connection, sha256-exact over the direct
path and over the relay, IPv4 and IPv6 virtual IPs; ICMP still rides DATAGRAMs through the
TUN; the redirect table is gone after a clean exit and after SIGKILL + restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ztna.agent.tcp_redirect import ruleset, table_name
from ztna.worlds.lab_tun import VIP4, VIP6, make_files, tun_world


def test_ruleset_shape() -> None:
    assert table_name("lab-1.x") == "ztna_lab_1_x"
    text = ruleset("ztna_a", ["10.100.0.2", "10.100.0.3"], ["fd00:100::2"], 4000, 4001)
    # Leftover of the same name is replaced atomically (add+delete in one transaction).
    assert text.startswith("add table inet ztna_a\ndelete table inet ztna_a\n")
    assert "type nat hook output priority -100;" in text
    assert "ip daddr { 10.100.0.2, 10.100.0.3 } meta l4proto tcp redirect to :4000" in text
    assert "ip6 daddr { fd00:100::2 } meta l4proto tcp redirect to :4001" in text
    assert "ip6" not in ruleset("ztna_a", ["10.100.0.2"], [], 4000, 0)


def _curl_both(world: Any, want: str) -> None:
    for url in (f"http://{VIP4}/blob", f"http://[{VIP6}]/blob"):
        res = world.curl(url, max_time=30)
        assert res["rc"] == 0 and res["code"] == 200, (url, res, world.agent_log()[-1500:])
        assert res["sha256"] == want, url


@pytest.mark.root
def test_stream_curl_direct_and_relay_v4_v6(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory(nat_a="cone", nat_b="cone", ip="dual", delay_ms=5)
    www = tmp_path / "www"
    want = make_files(www, {"blob": 3 * 1024 * 1024 + 17})["blob"]
    with tun_world(lab, tmp_path, www) as world:
        world.start_agent("stream")
        world.wait("direct")
        _curl_both(world, want)
        snap = world.status()
        assert snap["services"][0]["path"] == "direct"
        assert snap["userspace"]["tcp_direct"] >= 2           # the streams went direct
        assert snap["tcp_redirect"]["accepted"] >= 2
        assert snap["tcp_redirect"]["nft_table"] == "inet ztna_lab"
        # UDP/ICMP are not redirected: ping goes through the TUN as DATAGRAMs.
        lab.run("agent", ["ping", "-c", "2", "-i", "0.2", "-W", "2", VIP4])
        world.stop_agent()
        assert "ztna_lab" not in world.nft_tables()

        lab.block_udp("conn", 4434, direction="both")       # no direct path: relay only
        world.start_agent("stream")
        world.wait("relay")
        _curl_both(world, want)
        snap = world.status()
        assert snap["services"][0]["path"] == "relay"
        assert snap["userspace"]["tcp_direct"] == 0
        assert snap["userspace"]["tcp_opened"] >= 2
        world.stop_agent()


@pytest.mark.root
def test_redirect_rules_removed_on_exit_and_after_sigkill(lab_factory: Any, tmp_path: Path) -> None:
    lab = lab_factory(ip="dual")
    www = tmp_path / "www"
    want = make_files(www, {"blob": 200_000})["blob"]
    with tun_world(lab, tmp_path, www) as world:
        assert "ztna_lab" not in world.nft_tables()
        world.start_agent("stream")
        world.wait(None)
        assert "table inet ztna_lab" in world.nft_tables()
        world.stop_agent(kill=True)                          # SIGKILL: no cleanup ran, yet
        assert "ztna_lab" not in world.nft_tables()          # the owner table died with it
        world.start_agent("datagram")                        # restart: nothing stale in the way
        world.wait(None)
        assert "ztna_lab" not in world.nft_tables()
        res = world.curl(f"http://{VIP4}/blob", max_time=30)  # TCP in DATAGRAMs, not redirected
        assert res["sha256"] == want, res
        assert "tcp_redirect" not in world.status()
        world.stop_agent()
        world.start_agent("stream")
        world.wait(None)
        res = world.curl(f"http://[{VIP6}]/blob", max_time=30)
        assert res["sha256"] == want, res
        world.stop_agent()                                   # SIGTERM: clean exit
        assert "ztna_lab" not in world.nft_tables()


def test_without_nftables_falls_back_to_datagrams(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`stream` is the default: a host without nft must still start (TCP then rides the TUN)."""
    import asyncio

    from ztna.agent import tcp_redirect
    from ztna.agent.config import AgentOptions, parse_service
    from ztna.quic.config import TlsFiles

    class FakeTun:
        recorded: list[str] = []

        def record_nft_table(self, table: str) -> None:
            self.recorded.append(table)

    opts = AgentOptions(intermediate=("127.0.0.1", 4433), tls=TlsFiles(tmp_path / "c", tmp_path / "k", tmp_path / "a"),
                        services=(parse_service("web=10.100.0.2,fd00:100::2"),), name="t1", state_dir=tmp_path)
    monkeypatch.setattr(tcp_redirect.shutil, "which", lambda name: None)
    tun = FakeTun()

    async def go() -> dict[str, Any]:
        redirect = tcp_redirect.TcpRedirect(object(), opts, tun)  # type: ignore[arg-type]
        await redirect.start()
        assert redirect.servers == [] and not redirect.installed
        return redirect.snapshot()

    snap = asyncio.run(go())
    assert tun.recorded == ["ztna_t1"]
    assert snap["nft_table"] is None and "no nft binary" in snap["fallback"]
