"""The Agent's DNS answers for names of DNS-pattern services (pure: no socket, no clock).

`NameTable.answer(query_bytes, now=...)` takes one DNS query (wire format, parsed and built
with dnspython) and returns the response bytes, or None for input that is not a DNS query
at all (dropped and counted by the driver, `ztna.agent.dns`):

* a name covered by a service's patterns: A / AAAA with a synthetic address from that
  family's pool (`ztna.names.pool`), TTL = the pool's TTL, authoritative; another type for
  such a name (HTTPS, MX, TXT ...) gets an empty NOERROR answer (the name exists, nothing
  of that type), so clients go on to A/AAAA at once;
* a name outside every pattern: REFUSED. We are not a recursive resolver and must not
  pretend a name does not exist: REFUSED makes a stub resolver ask its next server (glibc,
  systemd-resolved), so with resolver routing only our domains reach us at all and with a
  plain resolv.conf the other names still resolve through the next `nameserver` line;
* pool exhausted: SERVFAIL (the name is ours but no address is free now; see the pool);
* not a standard query, several questions, a class other than IN: NOTIMP / FORMERR /
  REFUSED.

`lookup(ip, now=...)` maps a synthetic address back to (service, name) for the TCP redirect.
"""

from __future__ import annotations

from collections.abc import Mapping

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

from ztna.errors import DecodeError
from ztna.names.patterns import DomainPattern, best_service, normalize_name
from ztna.names.pool import Binding, SyntheticPool

__all__ = ["NameTable"]


class NameTable:
    def __init__(self, services: Mapping[str, tuple[DomainPattern, ...]], pools: list[SyntheticPool]) -> None:
        self.services = {sid: pats for sid, pats in services.items() if pats}
        self.pools = {p.version: p for p in pools}
        self.counts = {"answered": 0, "refused": 0, "nodata": 0, "servfail_exhausted": 0,
                       "malformed": 0, "not_implemented": 0}

    def service_for(self, name: str) -> str | None:
        try:
            return best_service(normalize_name(name), self.services)
        except DecodeError:
            return None

    def lookup(self, ip: str, *, now: float) -> Binding | None:
        for pool in self.pools.values():
            if ip in pool:
                return pool.lookup(ip, now=now)
        return None

    def is_synthetic(self, ip: str) -> bool:
        return any(ip in pool for pool in self.pools.values())

    def answer(self, data: bytes, *, now: float) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError):
            self.counts["malformed"] += 1
            return None
        if query.flags & dns.flags.QR:
            self.counts["malformed"] += 1
            return None                         # a response is no question for us
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if query.opcode() != dns.opcode.QUERY:
            self.counts["not_implemented"] += 1
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            self.counts["malformed"] += 1
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        service = None
        if q.rdclass == dns.rdataclass.IN:
            service = self.service_for(q.name.to_text(omit_final_dot=True))
        if service is None:
            self.counts["refused"] += 1
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        name = normalize_name(q.name.to_text(omit_final_dot=True))
        family = {dns.rdatatype.A: 4, dns.rdatatype.AAAA: 6}.get(q.rdtype)
        pool = self.pools.get(family) if family is not None else None
        if pool is None:
            self.counts["nodata"] += 1
            return response.to_wire()
        addr = pool.answer(service, name, now=now)
        if addr is None:
            self.counts["servfail_exhausted"] += 1
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        rdata_type = dns.rdtypes.IN.A.A if family == 4 else dns.rdtypes.IN.AAAA.AAAA
        rrset = dns.rrset.from_rdata(q.name, int(pool.ttl), rdata_type(dns.rdataclass.IN, q.rdtype, str(addr)))
        response.answer.append(rrset)
        self.counts["answered"] += 1
        return response.to_wire()

    def snapshot(self) -> dict[str, object]:
        return {**self.counts, "pools": [p.snapshot() for p in self.pools.values()],
                "domains": sorted({str(p) for pats in self.services.values() for p in pats})}
