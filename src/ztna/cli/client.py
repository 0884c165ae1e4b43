"""`ztna client`: the scriptable test client (an Agent or Connector stand-in).

    ztna client --server 127.0.0.1:4433 --pki ./pki --service echo --json
    ztna client --pki ./pki --service echo --send-udp hello --dst 10.0.0.1:9999 --verify-echo
    ztna client --pki ./pki --service echo --dst 10.0.0.1:9999 --payload-size max --verify-echo
    ztna client --pki ./pki --query-max-size               # table over IPv4/IPv6 × UDP payloads

Exit codes:
  0  everything asked for succeeded (or, with --expect-fail, the connection/registration failed)
  1  the connection or handshake failed, or the server closed the connection
  2  bad arguments
  3  a registration was refused (NACK) or not answered
  4  echo verification failed or an RTT probe timed out
  5  a datagram was refused locally as too large (never sent)
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from ztna import limits

EXIT_OK, EXIT_CONNECT, EXIT_USAGE, EXIT_REGISTRATION, EXIT_ECHO, EXIT_TOO_LARGE = 0, 1, 2, 3, 4, 5


def _usage(msg: str) -> NoReturn:
    click.echo(f"ztna client: {msg}", err=True)
    sys.exit(EXIT_USAGE)


@click.command(name="client")
@click.option("--server", default=f"127.0.0.1:{limits.INTERMEDIATE_PORT}", show_default=True,
              metavar="HOST:PORT")
@click.option("--server-name", default="localhost", show_default=True, help="TLS server name (SNI).")
@click.option("--pki", type=click.Path(file_okay=False, path_type=Path),
              help="Directory from `ztna certs init` (uses IDENTITY.pem/.key and ca.pem).")
@click.option("--identity", type=click.Choice(["agent", "connector"]), default=None,
              help="Which certificate of --pki to present (default agent; connector with --as-connector).")
@click.option("--ca-cert", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--client-cert", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--client-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--no-client-cert", is_flag=True, help="Present no certificate (to test refusal).")
@click.option("--service", "services", multiple=True, metavar="ID", help="Register for this service (repeatable).")
@click.option("--as-connector", is_flag=True, help="Register as a Connector instead of an Agent.")
@click.option("--send", "send_text", multiple=True, metavar="TEXT", help="Send TEXT as a raw DATAGRAM.")
@click.option("--send-hex", multiple=True, metavar="HEX", help="Send raw DATAGRAM bytes.")
@click.option("--send-udp", metavar="TEXT", help="Send a UDP packet with payload TEXT to --dst via 0x2F.")
@click.option("--dst", metavar="IP:PORT", help="Inner destination for --send-udp (the service's virtual address).")
@click.option("--src", metavar="IP:PORT", help="Inner source (default 10.0.0.100:12345 or [fd00::100]:12345).")
@click.option("--verify-echo", is_flag=True, help="Wait for byte-exact UDP echoes from --dst.")
@click.option("--payload-size", metavar="N|max|max-1|max+1",
              help="UDP payload size; max = the whole 0x2F datagram is exactly the tunnel maximum.")
@click.option("--payload-pattern", type=click.Choice(["zeros", "seq", "random"]), default="seq", show_default=True)
@click.option("--repeat", type=click.IntRange(1), default=1, show_default=True, help="Rounds of sends.")
@click.option("--burst", type=click.IntRange(1), default=1, show_default=True, help="Packets per round, back to back.")
@click.option("--delay", "delay_ms", type=click.FloatRange(0), default=0.0, help="Milliseconds between rounds.")
@click.option("--wait", "wait_ms", type=click.FloatRange(0), default=300.0, show_default=True,
              help="Milliseconds to collect replies when not verifying echoes.")
@click.option("--measure-rtt", is_flag=True, help="Measure echo RTTs through the tunnel (needs --dst).")
@click.option("--rtt-count", type=click.IntRange(1), default=10, show_default=True)
@click.option("--measure-handshake", is_flag=True, help="Print the handshake time (always in --json).")
@click.option("--query-max-size", is_flag=True, help="Report the live maximum DATAGRAM payload.")
@click.option("--udp-payload-sweep/--no-udp-payload-sweep", default=True, show_default=True,
              help="With --query-max-size: one connection per IPv4/IPv6 × UDP payload 1200..1452.")
@click.option("--udp-payload", type=click.IntRange(limits.MIN_QUIC_UDP_PAYLOAD, limits.MAX_QUIC_UDP_PAYLOAD),
              default=limits.DEFAULT_QUIC_UDP_PAYLOAD, show_default=True, help="This client's QUIC UDP payload.")
@click.option("--alpn", help="Offer this ALPN instead of ztna-v1 (a wrong one must fail).")
@click.option("--expect-fail", is_flag=True, help="Succeed only if the connection or a registration fails.")
@click.option("--timeout", type=click.FloatRange(0.1), default=5.0, show_default=True, help="Seconds per wait.")
@click.option("--hold", "hold_s", type=click.FloatRange(0), default=0.0, help="Stay connected SECONDS after sending.")
@click.option("--rotate-cid", type=click.FloatRange(0.1), default=None, metavar="SECONDS",
              help="Switch to a new connection ID every SECONDS.")
@click.option("--keylog", type=click.Path(dir_okay=False), help="Append TLS secrets to FILE.")
@click.option("--json", "as_json", is_flag=True, help="Print ONE JSON result object.")
def client(**a: Any) -> None:
    """Scriptable test client (QAD, registration, echo, sizes)."""
    from ztna.client.testclient import ClientOptions, parse_ip_port, run_client, run_query_sweep
    from ztna.errors import UsageError
    from ztna.intermediate.config import parse_host_port
    from ztna.quic.config import TlsFiles

    try:
        server = parse_host_port(a["server"])
        dst = parse_ip_port(a["dst"]) if a["dst"] else None
        src = parse_ip_port(a["src"]) if a["src"] else None
    except (ValueError, UsageError) as exc:
        _usage(str(exc))
        return
    pki: Path | None = a["pki"]
    ident = a["identity"] or ("connector" if a["as_connector"] else "agent")
    ca = a["ca_cert"] or (pki / "ca.pem" if pki else None)
    cert = a["client_cert"] or (pki / f"{ident}.pem" if pki else None)
    key = a["client_key"] or (pki / f"{ident}.key" if pki else None)
    if a["no_client_cert"]:
        cert = key = None
    if ca is None:
        _usage("need --ca-cert or --pki (the server is always verified against our CA)")
    for label, path in (("CA", ca), ("client certificate", cert), ("client key", key)):
        if path is not None and not Path(path).is_file():
            _usage(f"{label} {path} does not exist")
    if (cert is None) != (key is None):
        _usage("--client-cert and --client-key go together")
    raw: list[bytes] = [t.encode() for t in a["send_text"]]
    for h in a["send_hex"]:
        try:
            raw.append(bytes.fromhex(h))
        except ValueError:
            _usage(f"--send-hex {h!r} is not hex")
    size = a["payload_size"]
    if size is not None and not (size.isdigit() or size in ("max", "max-1", "max+1")):
        _usage(f"--payload-size {size!r}: use N, max, max-1 or max+1")
    if (a["send_udp"] is not None or size or a["measure_rtt"]) and (dst is None or not a["services"]):
        _usage("--send-udp, --payload-size and --measure-rtt need --dst and --service")
    opts = ClientOptions(
        server=server, tls=TlsFiles(cert=cert, key=key, ca=Path(ca)), server_name=a["server_name"],
        services=list(a["services"]), as_connector=a["as_connector"], raw_sends=raw,
        send_udp=a["send_udp"].encode() if a["send_udp"] is not None else None, dst=dst, src=src,
        payload_size=size, payload_pattern=a["payload_pattern"], repeat=a["repeat"], burst=a["burst"],
        delay_ms=a["delay_ms"], verify_echo=a["verify_echo"], measure_rtt=a["measure_rtt"],
        rtt_count=a["rtt_count"], alpn=a["alpn"], udp_payload=a["udp_payload"], timeout=a["timeout"],
        wait_ms=a["wait_ms"], cid_rotation=a["rotate_cid"], hold_s=a["hold_s"], keylog=a["keylog"],
    )
    if a["query_max_size"] and a["udp_payload_sweep"]:
        rows = asyncio.run(run_query_sweep(opts))
        _print_sweep(rows, a["as_json"])
        sys.exit(EXIT_OK if rows and all(r["error"] is None for r in rows) else EXIT_CONNECT)
    result = asyncio.run(run_client(opts))
    code = _exit_code(result)
    if a["expect_fail"]:
        failed = not result["connected"] or code in (EXIT_CONNECT, EXIT_REGISTRATION)
        result["expected_failure"] = failed
        result["ok"] = failed
        code = EXIT_OK if failed else EXIT_CONNECT
    if a["as_json"]:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        _print_human(result, a)
    sys.exit(code)


def _exit_code(r: dict[str, Any]) -> int:
    if r["ok"]:
        return EXIT_OK
    if not r["connected"] or any(e.startswith("connection closed") for e in r["errors"]):
        return EXIT_CONNECT
    if r["refused_locally"]:
        return EXIT_TOO_LARGE
    if any(v != "ack" for v in r["registrations"].values()):
        return EXIT_REGISTRATION
    if r["echo_ok"] is False or any(e.startswith(("echo", "rtt")) for e in r["errors"]):
        return EXIT_ECHO
    return EXIT_CONNECT


def _print_human(r: dict[str, Any], a: dict[str, Any]) -> None:
    out = click.echo
    out(f"connected: {r['connected']}"
        + (f" in {r['handshake_ms']:.1f} ms"
           if r["connected"] and r["handshake_ms"] is not None else ""))
    if r.get("close_reason"):
        out(f"closed by server: {r['close_reason']}")
    if a["measure_handshake"] and r["handshake_ms"] is not None:
        out(f"handshake_ms: {r['handshake_ms']:.3f}")
    if r["qad"]:
        out(f"qad: {r['qad']['ip']} port {r['qad']['port']}")
    for service, status in r["registrations"].items():
        out(f"registration {service}: {status}")
    if r["max_datagram_payload"] is not None:
        out(f"max_datagram_payload: {r['max_datagram_payload']}" +
            (f" (tunnel max for 0x2F: {r['tunnel_max']})" if r["tunnel_max"] is not None else ""))
    if r["sent"]:
        out(f"sent: {r['sent']}  echoed byte-exact: {r['echoed']}" +
            (f"  echo: {'PASS' if r['echo_ok'] else 'FAIL'}" if r["echo_ok"] is not None else ""))
    if r["rtt_ms"]:
        s = r["rtt_ms"]
        if "min" in s:
            out(f"rtt ms: min {s['min']:.3f} avg {s['avg']:.3f} p50 {s['p50']:.3f} p95 {s['p95']:.3f} "
                f"max {s['max']:.3f} (n={s['count']}, timeouts {s['timeouts']})")
        else:
            out(f"rtt: all {s['timeouts']} probes timed out")
    for m in r["messages"]:
        out(f"message: {m}")
    for e in r["errors"]:
        out(f"error: {e}", err=True)
    out("result: " + ("OK" if r["ok"] else "FAILED"))


def _print_sweep(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"ok": all(r["error"] is None for r in rows), "rows": rows}, sort_keys=True))
        return
    click.echo(f"{'family':<6} {'server':<16} {'udp_payload':>11} {'max_datagram':>12}  qad / error")
    for r in rows:
        qad = f"{r['qad']['ip']}:{r['qad']['port']}" if r["qad"] else ""
        mx = r["max_datagram_payload"] if r["max_datagram_payload"] is not None else "-"
        click.echo(f"{r['family']:<6} {r['server']:<16} {r['udp_payload']:>11} {mx!s:>12}  {r['error'] or qad}")
