"""Misconfiguration at start-up, for each of the three programs as real processes: ONE line
on stderr naming the file, flag or address and why, exit status 2, no traceback."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ztna.certs import init_pki

ZTNA = [sys.executable, "-m", "ztna"]
INFO_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (INFO|DEBUG) ")
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    init_pki(d, ["web"])
    return d


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ZTNA, *args], capture_output=True, text=True, timeout=timeout)


def one_line_exit_2(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    # INFO lines logged before the failing step (e.g. "listening on ...") are not errors
    lines = [ln for ln in err.splitlines() if ln.strip() and not INFO_LOG.match(ln)]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def intermediate(pki: Path, *extra: str) -> list[str]:
    return ["intermediate", "--pki", str(pki), "--listen", "127.0.0.1:0", "--metrics", "off", *extra]


def connector(pki: Path, *extra: str) -> list[str]:
    return ["connector", "--intermediate", "127.0.0.1:9", "--pki", str(pki),
            "--service", "web=10.100.0.2;udp:7=127.0.0.1:9", "--p2p-port", "0",
            "--metrics", "off", *extra]


def agent(pki: Path, state: Path, *extra: str) -> list[str]:
    return ["agent", "--intermediate", "127.0.0.1:9", "--pki", str(pki), "--service",
            "web=10.100.0.2", "--mode", "userspace", "--state-dir", str(state), *extra]


def programs(pki: Path, tmp: Path) -> dict[str, list[str]]:
    return {"intermediate": intermediate(pki), "connector": connector(pki),
            "agent": agent(pki, tmp / "state")}


# ------------------------------------------------------------------ config files
@pytest.mark.parametrize("program", ["intermediate", "connector", "agent"])
def test_non_utf8_config_file_is_one_line_exit_2(program: str, pki: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b'log_level = "info"\n# caf\xe9 in Latin-1\n')
    argv = [program, "--config", str(bad)]
    if program == "agent":
        argv += ["--intermediate", "127.0.0.1:9", "--service", "web=10.100.0.2"]
    one_line_exit_2(run(*argv), str(bad), "UTF-8")


def test_agent_config_file_unknown_key_and_bad_value(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text('intermediate = "127.0.0.1:9"\nservice = ["web=10.100.0.2"]\n')
    one_line_exit_2(run("agent", "--config", str(f)), str(f), "service", "unknown key")
    f.write_text('intermediate = "127.0.0.1:9"\np2p_cooldown = "soon"\n')
    one_line_exit_2(run("agent", "--config", str(f)), "p2p_cooldown")


def test_agent_config_file_runs_and_flags_override_it(pki: Path, tmp_path: Path) -> None:
    """The file alone is enough; a flag beats the file (the status socket is named after
    --name, not the file's name); the file beats the defaults (userspace forward)."""
    sys.path.insert(0, str(Path(__file__).parent / "intermediate"))
    from intermediate_helpers import IntermediateProc, free_tcp_port

    inter = IntermediateProc(["--pki", str(pki)], tmp_path / "intermediate.log").start()
    state = tmp_path / "state"
    fwd = free_tcp_port()
    f = tmp_path / "agent.toml"
    f.write_text(f'intermediate = "127.0.0.1:{inter.port}"\nserver_name = "localhost"\n'
                 f'pki = "{pki}"\nmode = "userspace"\nname = "from-file"\n'
                 f'state_dir = "{state}"\nforwards = ["127.0.0.1:{fwd}=web:80"]\n'
                 '[[services]]\nid = "web"\nvirtual_ips = ["10.100.0.2"]\n')
    proc = subprocess.Popen([*ZTNA, "agent", "--config", str(f), "--name", "from-flag"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        snap: dict = {}
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            st = run("status", "--state-dir", str(state), "--name", "from-flag", "--json")
            if st.returncode == 0:
                snap = json.loads(st.stdout)
                if snap["services"][0]["registration"] == "acked":
                    break
            time.sleep(0.2)
        assert snap["services"][0]["registration"] == "acked", snap
        assert snap["agent"]["name"] == "from-flag"
        assert not (state / "from-file.sock").exists()
        assert any(f":{fwd} -> web:80" in x for x in snap["userspace"]["listeners"]), snap
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert inter.stop() == 0


# ------------------------------------------------------------------ TLS files
def _bad_pkis(pki: Path, tmp: Path) -> list[tuple[str, Path, str]]:
    """(what is wrong, pki dir, words the line must carry) for every program."""
    cases = []
    for name, mutate, words in (
        ("garbage key", lambda d: [(d / f"{n}.key").write_text("not a key\n")
                                   for n in ("intermediate", "connector", "agent")],
         ".key"),
        ("key of another certificate", lambda d: [shutil.copy(d / "ca.key", d / f"{n}.key")
                                                  for n in ("intermediate", "connector", "agent")],
         "does not belong"),
        ("empty certificate", lambda d: [(d / f"{n}.pem").write_text("")
                                         for n in ("intermediate", "connector", "agent")],
         "no valid PEM certificate"),
        ("CA is not PEM", lambda d: (d / "ca.pem").write_bytes(b"\x00\x01junk"), "ca.pem"),
        ("key is a directory", lambda d: [((d / f"{n}.key").unlink(), (d / f"{n}.key").mkdir())
                                          for n in ("intermediate", "connector", "agent")],
         "is a directory"),
    ):
        d = tmp / name.replace(" ", "-")
        shutil.copytree(pki, d)
        mutate(d)
        cases.append((name, d, words))
    return cases


def test_bad_tls_files_are_one_line_exit_2_in_every_program(pki: Path, tmp_path: Path) -> None:
    for what, d, words in _bad_pkis(pki, tmp_path):
        for program, argv in programs(d, tmp_path).items():
            line = one_line_exit_2(run(*argv), str(d), words)
            assert program in line, (what, program, line)


# ------------------------------------------------------------------ flags
@pytest.mark.parametrize("argv", [
    ["intermediate", "--udp-payload", "9000"],
    ["intermediate", "--listen", "127.0.0.1"],
    ["intermediate", "--max-connections", "lots"],
    ["intermediate", "--metrics", "nowhere"],
    ["connector", "--p2p-port", "99999"],
    ["connector", "--relay-port", "x"],
    ["connector", "--metrics", "nowhere"],
    ["connector", "--log-level", "loud"],
    ["connector", "--service", "db=10.100.0.9;tcp:5432=127.0.0.1:5432;check=http:80/x=200"],
    ["connector", "--service", "db=10.100.0.9;udp:53=127.0.0.1:53;check=udp:53:zz=01"],
    ["connector", "--service", "db=10.100.0.9;tcp:5432=127.0.0.1:5432;check=ping"],
    ["connector", "--audit-interval", "0"],
    ["intermediate", "--audit-log-backups", "-1"],
    ["agent", "--service", "web"],
    ["agent", "-L", "8080"],
    ["agent", "--socks", "[::1"],
    ["agent", "--p2p-cooldown", "0"],
    ["agent", "--metrics", "127.0.0.1:99999"],
    ["agent", "--tun-name", "a-name-longer-than-15"],
    ["connector", "--dns-server", "dns.example"],
    ["connector", "--service", "corp=*.corp.test;udp:53=:53"],
    ["connector", "--service", "corp=a.*.corp.test;tcp:80"],
    ["agent", "--service", "corp=*.corp.test,*.CORP.test"],
    ["agent", "--dns-pool", "100.80.0.0/33"],
    ["agent", "--dns-pool", "100.80.0.0/16", "--dns-pool", "100.81.0.0/16"],
    ["agent", "--dns-ttl", "0"],
])
def test_bad_flags_exit_2(argv: list[str], pki: Path, tmp_path: Path) -> None:
    program, extra = argv[0], argv[1:]
    base = programs(pki, tmp_path)[program]
    proc = run(*base, *extra)
    assert proc.returncode == 2, (argv, proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr


def test_agent_without_intermediate_or_service_exits_2(pki: Path) -> None:
    one_line_exit_2(run("agent", "--pki", str(pki), "--service", "web=10.100.0.2"), "--intermediate")
    one_line_exit_2(run("agent", "--pki", str(pki), "--intermediate", "127.0.0.1:9"), "--service")


# ------------------------------------------------------------------ addresses in use
def _held_udp(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    return s, s.getsockname()[1]


def _held_tcp() -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s, s.getsockname()[1]


def test_address_in_use_names_address_and_port_in_every_program(pki: Path, tmp_path: Path) -> None:
    u, uport = _held_udp()
    t, tport = _held_tcp()
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    v6.bind(("::1", 0))
    v6.listen()
    v6port = v6.getsockname()[1]
    st = tmp_path / "state"
    try:
        cases = [
            (["intermediate", "--pki", str(pki), "--listen", f"127.0.0.1:{uport}", "--metrics", "off"],
             f"udp 127.0.0.1:{uport}"),
            (["intermediate", "--pki", str(pki), "--listen", "127.0.0.1:0", "--metrics",
              f"127.0.0.1:{tport}"], f"tcp 127.0.0.1:{tport}"),
            (["intermediate", "--pki", str(pki), "--listen", "127.0.0.1:0", "--metrics",
              f"[::1]:{v6port}"], f"tcp [::1]:{v6port}"),
            (connector(pki, "--p2p-port", str(uport)), f":{uport}"),
            (["connector", "--intermediate", "127.0.0.1:9", "--pki", str(pki), "--service",
              "web=10.100.0.2;udp:7=127.0.0.1:9", "--p2p-port", "0", "--metrics",
              f"127.0.0.1:{tport}"], f"tcp 127.0.0.1:{tport}"),
            (agent(pki, st, "-L", f"127.0.0.1:{tport}=web:80"), f"tcp 127.0.0.1:{tport}"),
            (agent(pki, st, "-U", f"127.0.0.1:{uport}=web:53"), f"udp 127.0.0.1:{uport}"),
            (agent(pki, st, "--socks", f"127.0.0.1:{tport}"), f"tcp 127.0.0.1:{tport}"),
            (agent(pki, st, "--metrics", f"127.0.0.1:{tport}"), f"tcp 127.0.0.1:{tport}"),
        ]
        for argv, where in cases:
            one_line_exit_2(run(*argv), where, "already in use")
    finally:
        u.close()
        t.close()
        v6.close()


def test_second_agent_with_the_same_name_exits_2_with_a_hint(pki: Path, tmp_path: Path) -> None:
    st = tmp_path / "state"
    first = subprocess.Popen([*ZTNA, *agent(pki, st, "--name", "twin")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (st / "twin.sock").exists():
            time.sleep(0.1)
        assert (st / "twin.sock").exists()
        time.sleep(0.3)
        line = one_line_exit_2(run(*agent(pki, st, "--name", "twin")), "--name", "--state-dir")
        assert "twin" in line
        assert first.poll() is None  # the first one is untouched
        assert (st / "twin.sock").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(10)
    assert os.path.exists(st)


def test_agent_with_a_certificate_from_another_ca_logs_error_not_connected(pki: Path,
                                                                           tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "intermediate"))
    from intermediate_helpers import IntermediateProc

    other = tmp_path / "other"
    init_pki(other, ["web"])
    mixed = tmp_path / "mixed"   # the right CA, but our certificate comes from another one
    mixed.mkdir()
    shutil.copy(pki / "ca.pem", mixed / "ca.pem")
    shutil.copy(other / "agent.pem", mixed / "agent.pem")
    shutil.copy(other / "agent.key", mixed / "agent.key")
    inter = IntermediateProc(["--pki", str(pki)], tmp_path / "intermediate.log").start()
    argv = ["agent", "--intermediate", f"127.0.0.1:{inter.port}", "--server-name", "localhost",
            "--pki", str(mixed), "--service", "web=10.100.0.2", "--mode", "userspace",
            "--state-dir", str(tmp_path / "state")]
    proc = subprocess.Popen([*ZTNA, *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(4)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=10)[0].decode()
        assert inter.stop() == 0
    errors = [ln for ln in out.splitlines() if " ERROR " in ln]
    assert errors, out
    assert all("refused our certificate" in ln and "same CA" in ln and "ztna certs show" in ln
               for ln in errors), errors
    assert not re.search(r": connected \(", out), out   # never announced when refused
    reconnects = [ln for ln in out.splitlines() if "reconnecting in" in ln]
    delays = [float(ln.rsplit(" ", 1)[1].rstrip("s")) for ln in reconnects]
    assert 1 <= len(delays) < 15, out             # backs off instead of spinning


def test_bad_health_check_and_audit_log_are_one_line_exit_2(pki: Path, tmp_path: Path) -> None:
    base = connector(pki)
    one_line_exit_2(run(*base, "--service", "db=10.100.0.9;tcp:5432=127.0.0.1:5432;check=http:80/healthz"),
                    "no tcp backend on virtual port 80")
    one_line_exit_2(run(*base, "--service", "db=10.100.0.9;udp:53=127.0.0.1:53;check=udp:53"),
                    "expected udp:PORT:PAYLOADHEX=REPLYHEX")
    missing = tmp_path / "no-such-dir" / "audit.jsonl"
    one_line_exit_2(run(*base, "--audit-log", str(missing)), "cannot open the audit log", str(missing))
    one_line_exit_2(run(*intermediate(pki, "--audit-log", str(missing))), "cannot open the audit log")
