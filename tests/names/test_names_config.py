"""The `--service` spellings with DNS patterns, Connector and Agent, and their errors."""

from __future__ import annotations

import pytest

from ztna.agent.config import parse_service
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
