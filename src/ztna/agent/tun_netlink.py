"""Netlink work for the TUN device, run in a short-lived helper process.

    python -m ztna.agent.tun_netlink '<json request>'     # prints one JSON answer

pyroute2 is several megabytes of every process that imports it (its modules stay loaded for
good), and the Agent needs netlink only at start, on an MTU change and at exit. So
`ztna.agent.tun` runs each of those steps here, in a child that exits when it is done, and
the Agent's steady state holds no netlink library. Requests (`op` plus arguments):

* `recover` {tun, routes}: delete the routes and the device (if it is still a TUN) that a
  dead Agent left; answers {cleaned, warnings}.
* `configure` {tun, v4, v6, mtu, routes}: MTU and up, the Agent's /32 and /128, one route per
  virtual IP (replacing another owner's); answers {index, addresses, warnings} or {error}.
* `set_mtu` {index, mtu}: answers {} or {error}.
* `close` {tun, index, routes}: routes and device removed (quietly if already gone).

Exit code 0 with an `error` key for a netlink refusal the caller reports; anything else
(bad request, crash) is a non-zero exit and a traceback on stderr.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import sys
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

IFA_F_NODAD = 0x02


def _route(ipr: IPRoute, action: str, dst: str, index: int | None = None, src: str | None = None) -> None:
    """`dst` is an address (a host route) or a prefix (the synthetic pools of names)."""
    ip = ipaddress.ip_network(dst, strict=True)
    kwargs: dict[str, Any] = {"dst": str(ip)}
    if ip.version == 6:
        kwargs["family"] = socket.AF_INET6
    if index is not None:
        kwargs["oif"] = index
    if src is not None:
        kwargs["prefsrc"] = src
    ipr.route(action, **kwargs)


def _is_tun(ipr: IPRoute, index: int) -> bool:
    try:
        link = ipr.get_links(index)[0]
    except (NetlinkError, IndexError):
        return False
    info = link.get_attr("IFLA_LINKINFO")
    return info is not None and info.get_attr("IFLA_INFO_KIND") == "tun"


def recover(req: dict[str, Any]) -> dict[str, Any]:
    cleaned = False
    warnings: list[str] = []
    with IPRoute() as ipr:
        for dst in req.get("routes", []):
            try:
                _route(ipr, "del", dst)
                cleaned = True
            except NetlinkError:
                pass
        name = req.get("tun")
        if name:
            idx = ipr.link_lookup(ifname=name)
            if idx and _is_tun(ipr, idx[0]):
                try:
                    ipr.link("del", index=idx[0])
                    cleaned = True
                except NetlinkError as exc:
                    warnings.append(f"could not delete stale device {name}: {exc}")
    return {"cleaned": cleaned, "warnings": warnings}


def configure(req: dict[str, Any]) -> dict[str, Any]:
    name, v4, v6, mtu = req["tun"], req["v4"], req["v6"], int(req["mtu"])
    routes: list[str] = req["routes"]
    addresses: list[str] = []
    warnings: list[str] = []
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return {"error": f"device {name} not found"}
        index = found[0]
        has_v6 = any(":" in r for r in routes)
        try:
            ipr.link("set", index=index, mtu=mtu, state="up")
            ipr.addr("add", index=index, address=v4, prefixlen=32)
            addresses.append(v4)
            if has_v6:
                try:
                    ipr.addr("add", index=index, address=v6, prefixlen=128, flags=IFA_F_NODAD)
                    addresses.append(v6)
                except NetlinkError as exc:
                    warnings.append(f"no IPv6 on {name} ({exc}); IPv6 virtual IPs unreachable")
            for dst in routes:
                src = v6 if ":" in dst else v4
                if ":" in dst and v6 not in addresses:
                    continue
                try:
                    _route(ipr, "add", dst, index, src)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        raise
                    # Someone else routes this IP: replace, the user asked for the tunnel.
                    _route(ipr, "replace", dst, index, src)
        except NetlinkError as exc:
            return {"error": f"configuring {name}: {exc}", "index": index, "addresses": addresses}
    return {"index": index, "addresses": addresses, "warnings": warnings}


def set_mtu(req: dict[str, Any]) -> dict[str, Any]:
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=int(req["index"]), mtu=int(req["mtu"]))
    except NetlinkError as exc:
        return {"error": str(exc)}
    return {}


def close(req: dict[str, Any]) -> dict[str, Any]:
    index = int(req.get("index") or 0)
    with IPRoute() as ipr:
        for dst in req.get("routes", []):
            try:
                _route(ipr, "del", dst, index or None)
            except NetlinkError:
                pass
        idx = ipr.link_lookup(ifname=req["tun"])
        if idx and idx[0] == index and _is_tun(ipr, idx[0]):
            try:
                ipr.link("del", index=idx[0])
            except NetlinkError:
                pass   # already gone with the fd (not persistent)
    return {}


OPS = {"recover": recover, "configure": configure, "set_mtu": set_mtu, "close": close}


def main(argv: list[str]) -> int:
    req = json.loads(argv[1])
    print(json.dumps(OPS[req["op"]](req)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
