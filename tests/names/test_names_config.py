"""The `--service` spellings with DNS patterns, Connector and Agent, and their errors."""

from __future__ import annotations

import pytest

from ztna.agent.config import AgentOptions, parse_service
from ztna.agent.dns import routing_domains
from ztna.connector.config import ServiceConfig, parse_service_flag
from ztna.errors import UsageError


def test_connector_flag_with_patterns_and_port_maps() -> None:
    svc = ServiceConfig.model_validate(parse_service_flag("corp=*.corp.test,Git.Corp.Test;tcp:80;tcp:443=:8443"))
    assert svc.virtual_ips == [] and svc.domains == ["*.corp.test", "git.corp.test"]
    assert {p: (b.host, b.port) for p, b in svc.tcp.items()} == {80: ("", 80), 443: ("", 8443)}
    mixed = ServiceConfig.model_validate(parse_service_flag("web=10.100.0.2,app.web.test;tcp:80=127.0.0.1:8080"))
    assert mixed.virtual_ips == ["10.100.0.2"] and mixed.domains == ["app.web.test"]


@pytest.mark.parametrize("flag,why", [
    ("corp=*.corp.test;udp:53", "expected KEY=VALUE"),
    ("corp=*.corp.test;tcp:80;udp:53=:53", "needs HOST:PORT"),
    ("corp=*.corp.test;tcp:80;udp:53=10.0.0.1:53", "need virtual IPs"),
    ("corp=*.corp.test;icmp=on", "needs a tcp:PORT"),
    ("corp=a.*.test;tcp:80", "only as the whole first label"),
    ("corp=*.corp.test;tcp:80=:0", "bad port"),
])
def test_connector_flag_errors(flag: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        ServiceConfig.model_validate(parse_service_flag(flag))


def test_agent_flag() -> None:
    spec = parse_service("corp=*.corp.test,git.corp.test,10.100.0.9")
    assert [str(p) for p in spec.patterns] == ["*.corp.test", "git.corp.test"]
    assert [str(ip) for ip in spec.virtual_ips] == ["10.100.0.9"]
    with pytest.raises(UsageError, match="given twice"):
        parse_service("corp=*.corp.test,*.CORP.test")
    with pytest.raises(UsageError):
        parse_service("corp=")


def test_resolver_routing_domains_and_pools() -> None:
    from pathlib import Path

    from ztna.quic.config import TlsFiles

    tls = TlsFiles(Path("c.pem"), Path("c.key"), Path("ca.pem"))
    opts = AgentOptions(intermediate=("127.0.0.1", 4433), tls=tls, services=(
        parse_service("corp=*.corp.test,git.corp.test"), parse_service("dev=*.corp.test.dev,x.corp.test")))
    # systemd-resolved routing domains: one per pattern suffix, never a default route.
    assert routing_domains(opts) == ["~corp.test", "~git.corp.test", "~corp.test.dev", "~x.corp.test"]
    assert opts.service_for_name("X.corp.test.")[0].id == "dev"        # type: ignore[index]
    assert opts.service_for_name("y.corp.test")[0].id == "corp"        # type: ignore[index]
    assert opts.service_for_name("corp.test") is None
    with pytest.raises(ValueError, match="overlaps a virtual IP"):
        AgentOptions(intermediate=("127.0.0.1", 4433), tls=tls,
                     services=(parse_service("web=100.80.0.9"), parse_service("corp=*.corp.test")))
    # Without DNS-pattern services the pools are unused, so a virtual IP there is fine.
    AgentOptions(intermediate=("127.0.0.1", 4433), tls=tls, services=(parse_service("web=100.80.0.9"),))
    with pytest.raises(ValueError, match="two services"):
        AgentOptions(intermediate=("127.0.0.1", 4433), tls=tls,
                     services=(parse_service("a=*.corp.test"), parse_service("b=*.corp.test")))


def test_name_only_entries_have_no_fixed_backend_to_health_check() -> None:
    svc = ServiceConfig.model_validate(parse_service_flag("corp=10.1.0.1,*.corp.test;tcp:80;tcp:22=127.0.0.1:22"))
    assert [(c.kind, c.port) for c in svc.health_checks()] == [("tcp", 22)]
    with pytest.raises(ValueError, match="reached by name only"):
        ServiceConfig.model_validate(parse_service_flag("corp=*.corp.test;tcp:80;check=tcp:80"))
