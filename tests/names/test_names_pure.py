"""Pure parts of apps by name: pattern matching, the synthetic pool with TTL expiry and
exhaustion, and the DNS answers (dnspython messages, no socket)."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from ztna.errors import DecodeError, UsageError
from ztna.names.answer import NameTable
from ztna.names.patterns import (
    DomainPattern,
    best_service,
    check_disjoint,
    normalize_name,
    parse_patterns,
)
from ztna.names.pool import SyntheticPool


def test_normalize_name() -> None:
    assert normalize_name("App1.Corp.Test.") == "app1.corp.test"
    for bad in ("", ".", "a..b", "-a.test", "a-.test", "a_b.test", "10.0.0.1", "é.test",
                "a" * 64 + ".test", ".".join(["a" * 63] * 4) + ".t", "a b.test"):
        with pytest.raises(DecodeError):
            normalize_name(bad)


def test_wildcard_covers_every_depth_below_but_not_the_suffix() -> None:
    pat = DomainPattern.parse("*.corp.test")
    assert pat.matches("app1.corp.test") and pat.matches("a.b.corp.test")
    assert not pat.matches("corp.test")
    assert not pat.matches("evilcorp.test")          # a suffix match is on a label boundary
    assert not pat.matches("corp.test.evil")
    exact = DomainPattern.parse("Git.Corp.Test")
    assert exact.matches("git.corp.test") and not exact.matches("x.git.corp.test")
    for bad in ("*", "*.test", "a.*.test", "**.corp.test", "*corp.test"):
        with pytest.raises(DecodeError):
            DomainPattern.parse(bad)


def test_most_specific_service_wins() -> None:
    services = {"corp": parse_patterns(["*.corp.test"]), "git": parse_patterns(["git.corp.test"]),
                "dev": parse_patterns(["*.dev.corp.test"])}
    assert best_service("git.corp.test", services) == "git"
    assert best_service("x.dev.corp.test", services) == "dev"
    assert best_service("x.corp.test", services) == "corp"
    assert best_service("x.other.test", services) is None
    with pytest.raises(DecodeError):
        check_disjoint({"a": parse_patterns(["*.x.test"]), "b": parse_patterns(["*.X.test"])})
    with pytest.raises(DecodeError):
        parse_patterns(["a.test", "A.test."])


def test_pool_binds_refreshes_and_expires_with_the_ttl() -> None:
    pool = SyntheticPool("100.80.0.0/16", ttl=10, grace=2)
    a = pool.answer("corp", "app1.corp.test", now=0)
    assert a == ipaddress.IPv4Address("100.80.0.1")
    assert pool.answer("corp", "app2.corp.test", now=1) == ipaddress.IPv4Address("100.80.0.2")
    assert pool.answer("corp", "app1.corp.test", now=5) == a            # stable while bound
    b = pool.lookup("100.80.0.1", now=16.9)
    assert b is not None and (b.service, b.name) == ("corp", "app1.corp.test")
    assert pool.lookup("100.80.0.2", now=13) is None                   # 1 + 10 + 2 passed
    assert pool.lookup("100.80.0.1", now=17) is None                   # 5 + 10 + 2 passed
    assert pool.expired == 2 and len(pool) == 0
    assert pool.lookup("10.0.0.1", now=17) is None and pool.lookup("fd00::1", now=17) is None


def test_pool_exhaustion_refuses_and_never_steals_a_bound_address() -> None:
    pool = SyntheticPool("100.80.0.0/29", ttl=5, grace=0)              # .1 .. .6
    got = [pool.answer("corp", f"n{i}.corp.test", now=0) for i in range(6)]
    assert [str(ip) for ip in got] == [f"100.80.0.{i}" for i in range(1, 7)]
    assert pool.answer("corp", "n6.corp.test", now=4) is None
    assert pool.exhausted == 1
    assert pool.answer("corp", "n0.corp.test", now=4) == got[0]        # bound names still answer
    # n1 expires at 5 (n0 was refreshed until 9): the freed address goes to the new name.
    assert pool.answer("corp", "n6.corp.test", now=5.5) == got[1]
    assert pool.lookup(got[1], now=5.5).name == "n6.corp.test"          # type: ignore[union-attr]
    assert pool.lookup(got[0], now=5.5).name == "n0.corp.test"          # type: ignore[union-attr]


def test_pool_reuses_released_addresses_oldest_first_and_v6() -> None:
    pool = SyntheticPool("fd00:80::/126", ttl=1, grace=0)              # ::1 .. ::3
    first = [pool.answer("s", f"a{i}.x.test", now=0) for i in range(3)]
    assert [str(ip) for ip in first] == ["fd00:80::1", "fd00:80::2", "fd00:80::3"]
    assert pool.answer("s", "b.x.test", now=2) == first[0]
    assert pool.answer("s", "c.x.test", now=2) == first[1]
    with pytest.raises(UsageError):
        SyntheticPool("100.80.0.0/16", ttl=0)


def _ask(table: NameTable, name: str, rdtype: str, now: float = 0) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    wire = table.answer(q.to_wire(), now=now)
    assert wire is not None
    r = dns.message.from_wire(wire)
    assert r.id == q.id and r.flags & dns.flags.QR
    return r


def test_answers() -> None:
    table = NameTable({"corp": parse_patterns(["*.corp.test", "git.corp.test"]), "web": ()},
                      [SyntheticPool("100.80.0.0/30", ttl=7), SyntheticPool("fd00:80::/64", ttl=7)])
    r = _ask(table, "App1.corp.test", "A")
    assert r.rcode() == dns.rcode.NOERROR and r.flags & dns.flags.AA
    (rrset,) = r.answer
    assert rrset.ttl == 7 and [rr.address for rr in rrset] == ["100.80.0.1"]
    assert str(rrset.name) == "App1.corp.test."          # the question's spelling, as asked
    r6 = _ask(table, "app1.corp.test", "AAAA")
    assert [rr.address for rr in r6.answer[0]] == ["fd00:80::1"] and r6.answer[0].ttl == 7
    binding = table.lookup("100.80.0.1", now=1)
    assert binding is not None and (binding.service, binding.name) == ("corp", "app1.corp.test")
    assert table.lookup("fd00:80::1", now=1) is not None
    outside = _ask(table, "www.example.org", "A")
    assert outside.rcode() == dns.rcode.REFUSED and not outside.answer
    assert not outside.flags & dns.flags.AA
    nodata = _ask(table, "git.corp.test", "HTTPS")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert _ask(table, "b.corp.test", "A").rcode() == dns.rcode.NOERROR       # 100.80.0.2
    assert _ask(table, "c.corp.test", "A").rcode() == dns.rcode.SERVFAIL      # /30: two only
    assert _ask(table, "c.corp.test", "A", now=100).answer[0][0].address == "100.80.0.1"
    assert table.answer(b"\x00\x01garbage", now=0) is None
    response = dns.message.make_response(dns.message.make_query("a.corp.test", "A")).to_wire()
    assert table.answer(response, now=0) is None                                # not a query
    assert table.counts["refused"] == 1 and table.counts["servfail_exhausted"] == 1
    assert table.counts["malformed"] == 2
