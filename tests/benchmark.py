"""End-to-end benchmark: the sidecar against direct TLS and its C peers (not collected by pytest).

Run from the repository root (about 10 minutes with the defaults; ``--quick`` well under one)::

    .venv/bin/python -m tests.benchmark [--rounds 3] [--seconds 10] [--copy-mb 300] [--json FILE]

Why it is built the way it is:

* A sidecar's cost only shows against the same server on the same machine in the same minute,
  so every figure is reported as a **ratio to a direct libpq TLS connection measured in the same
  run**, and the targets are run interleaved (round r starts at target r, so A B C, B C A, ...)
  for machine noise and warm-up order to cancel; the median of the rounds is reported.
* The sidecar runs as a **subprocess** (``python -m proxy run``) so its CPU time can be read from
  ``/proc/<pid>/stat`` before and after each workload; the same is done for stunnel and
  PgBouncer, whose whole process is the proxy.
* The server is the TLS-only PostgreSQL of the test suite (``proxy.demo.cluster``), so nothing
  reaches it without TLS and SCRAM, as on Azure.
* Peers are configured as equivalents of the sidecar: stunnel ``protocol = pgsql`` client mode
  with chain and host name checks; PgBouncer in session mode with ``server_tls_sslmode =
  verify-full``, SCRAM pass-through from ``auth_file``, and ``server_lifetime = 0`` so that every
  client connection gets its own new server connection, like the sidecar (no pooling advantage).
  stunnel's pgsql mode leaves the server's ``SCRAM-SHA-256-PLUS`` offer in place, which libpq
  on the plaintext leg refuses; that failure is reported, and stunnel is then measured with an
  md5 role (and its connect-per-transaction ratio against direct TLS with the same md5 role, as
  md5 is much cheaper than SCRAM).
* Missing peers are installed with ``apt-get install stunnel4 pgbouncer`` when running as root on
  Debian (``--no-install`` skips that); a peer that still cannot run is reported, not fatal.
* Ctrl-C or SIGTERM at any point stops every process started here and removes the temporary
  directory.

Workloads (bounded by ``--seconds`` or ``--copy-mb``):

==================  ===========================================================================
``select_c8``       ``pgbench -S -c 8 -j 2``: read-only throughput (tps)
``select_connect``  ``pgbench -S -C -c 4 -j 2``: a new connection per transaction (tps)
``select_c1``       ``pgbench -S -c 1``: single-client latency (ms)
``copy_out``        ``psql`` ``\\copy (SELECT ...) TO /dev/null`` of ``--copy-mb`` MiB (MB/s)
``copy_in``         psycopg ``copy.write`` of pre-built 1 MiB blocks into an unlogged table (MB/s)
==================  ===========================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

import psycopg

from proxy.demo.cluster import TlsOnlyCluster, find_bindir
from proxy.demo.pki import CertificateAuthority

REPO: Final = Path(__file__).resolve().parents[1]
USER: Final = "bench"
PASSWORD: Final = "bench-secret-pw"
DATABASE: Final = "bench"
MD5_USER: Final = "bench_md5"
MD5_PASSWORD: Final = "bench-md5-pw"
COPY_ROW: Final = 1024  # bytes per COPY text row, newline included
START_TIMEOUT: Final = 30.0
STOP_TIMEOUT: Final = 15.0
POLL: Final = 0.02  # polling a condition (a log line, a port), never a guess at a duration
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

WORKLOADS: Final = ("select_c8", "select_connect", "select_c1", "copy_out", "copy_in")
WORKLOAD_TITLES: Final = {
    "select_c8": "pgbench -S -c 8 (tps)",
    "select_connect": "pgbench -S -C -c 4 (tps)",
    "select_c1": "pgbench -S -c 1 latency (ms)",
    "copy_out": "COPY TO STDOUT (MB/s)",
    "copy_in": "COPY FROM STDIN (MB/s)",
}
LOWER_IS_BETTER: Final = frozenset({"select_c1"})
ALL_TARGETS: Final = ("direct", "sidecar", "sidecar-nometrics", "stunnel", "pgbouncer")
# Not run unless asked for (--targets): the sidecar with asyncio's own TLS transport on the
# upstream leg instead of proxy.tls_transport, to measure what that transport buys; the sidecar
# as a supervisor with two worker processes sharing the port (--workers 2), for hosts with
# more cores than this benchmark's two.
EXTRA_TARGETS: Final = ("sidecar-asyncio-tls", "sidecar-workers")
SIDECAR_TARGETS: Final = ("sidecar", "sidecar-nometrics", "sidecar-asyncio-tls", "sidecar-workers")
# With --compare-checkout DIR: the sidecar (metrics on) run from another checkout, e.g. a
# ``git worktree`` of the commit before a change, so before and after share one invocation.
COMPARE_TARGET: Final = "sidecar-compare"
WORKERS_TARGET_PROCESSES: Final = 2


class BenchmarkError(Exception):
    """Set-up failed in a way that makes the whole run meaningless (server, sidecar)."""


class PeerUnavailable(Exception):
    """A peer could not be installed, started or logged into; reported, the run goes on."""


# -- processes --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), from ``/proc/<pid>/stat``."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def tree_cpu_seconds(pid: int) -> float:
    """``cpu_seconds`` of the process and its live children (a sidecar's worker processes)."""
    total = cpu_seconds(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += tree_cpu_seconds(int(child))
    return total


def wait_until(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Poll ``ready`` until it holds; fail early if ``proc`` exits, late after a deadline."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            raise PeerUnavailable(f"{what} exited with {proc.returncode}: {tail(log)}")
        if time.monotonic() > deadline:
            raise PeerUnavailable(f"{what} not ready after {START_TIMEOUT:.0f} s: {tail(log)}")
        time.sleep(POLL)


def port_open(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    return check


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Service:
    """A long-running process started by the benchmark, stopped by its pid only."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def spawn(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    as_user: str | None = None,
    env: dict[str, str] | None = None,
) -> Service:
    """Start ``argv`` in its own session (a Ctrl-C is handled here, in order) tied to our life.

    ``setpriv --pdeathsig`` makes the kernel send SIGTERM should this process die without
    cleaning up; ``as_user`` drops root for programs that refuse it (PgBouncer).
    """
    prefix: list[str] = []
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        prefix = [setpriv, "--pdeathsig=TERM"]
        if as_user is not None and os.geteuid() == 0:
            prefix += [f"--reuid={as_user}", f"--regid={as_user}", "--init-groups"]
        prefix.append("--")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=log.parent,
            env=clean_env() if env is None else env,
            start_new_session=True,
        )
    return Service(name, proc, log)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


# -- targets ------------------------------------------------------------------------------------


@dataclass
class Target:
    """Somewhere a libpq client can connect to reach the benchmark database."""

    name: str
    description: str
    port: int
    sslmode: str
    user: str = USER
    password: str = PASSWORD
    service: Service | None = None
    workloads: frozenset[str] = frozenset(WORKLOADS)
    baseline: dict[str, str] = field(default_factory=dict)  # workload -> baseline target
    notes: list[str] = field(default_factory=list)

    def env(self, ca_pem: Path) -> dict[str, str]:
        """libpq's environment: pgbench, psql and psycopg all read it, so all connect alike."""
        return clean_env(
            PGHOST="localhost",
            PGHOSTADDR="127.0.0.1",
            PGPORT=str(self.port),
            PGUSER=self.user,
            PGPASSWORD=self.password,
            PGDATABASE=DATABASE,
            PGSSLMODE=self.sslmode,
            PGSSLROOTCERT=str(ca_pem),
            PGGSSENCMODE="disable",
            PGCONNECT_TIMEOUT="10",
            PGAPPNAME="benchmark",
        )

    def conninfo(self, ca_pem: Path) -> str:
        """The same parameters as ``env`` as a conninfo string, for psycopg in this process."""
        return psycopg.conninfo.make_conninfo(
            host="localhost",
            hostaddr="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=DATABASE,
            sslmode=self.sslmode,
            sslrootcert=str(ca_pem),
            gssencmode="disable",
            connect_timeout=10,
            application_name="benchmark",
        )

    def cpu(self) -> float | None:
        return None if self.service is None else tree_cpu_seconds(self.service.pid)


def login_error(target: Target, ca_pem: Path) -> str | None:
    """None if ``SELECT 1`` works through the target, else libpq's message."""
    out = subprocess.run(
        ["psql", "-XAtq", "-c", "SELECT 1"],
        env=target.env(ca_pem),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if out.returncode == 0 and out.stdout.strip() == "1":
        return None
    return " ".join(out.stderr.split()) or f"psql exited with {out.returncode}"


def start_sidecar(
    work: Path,
    cluster: TlsOnlyCluster,
    *,
    metrics: bool,
    event_loop: str = "asyncio",
    name: str | None = None,
    tls_transport: str = "sidecar",
    workers: int = 1,
    repo: Path = REPO,
) -> Service:
    """``python -m proxy run`` from ``repo`` (this checkout by default); the listening port is
    read from its log."""
    name = name or ("sidecar" if metrics else "sidecar-nometrics")
    log = work / f"{name}.log"
    argv = [sys.executable, "-m", "proxy", "run", "--listen", "127.0.0.1:0"]
    argv += ["--event-loop", event_loop]
    if workers > 1:
        argv += ["--workers", str(workers)]
    argv += [
        "--upstream",
        f"host=localhost hostaddr=127.0.0.1 port={cluster.port} "
        f"sslmode=verify-full sslrootcert={cluster.ca_pem_path}",
    ]
    if metrics:
        argv += ["--admin-listen", "off"]
    else:
        config = work / f"{name}.yaml"
        config.write_text('admin:\n  listen: "off"\n  protocol_metrics: false\n')
        argv += ["--config", str(config)]
    # That checkout's proxy package, whatever the interpreter has installed (the services run
    # in the work directory, so the current directory adds no package of its own).
    env = clean_env(PYTHONPATH=str(repo), PG_TLS_SIDECAR_TLS_TRANSPORT=tls_transport)
    return spawn(name, argv, log, env=env)


def _revision(checkout: Path) -> str:
    """The commit a checkout is at (``git describe``), or "not a git checkout"."""
    out = subprocess.run(
        ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() if out.returncode == 0 else "not a git checkout"


def sidecar_port(service: Service, workers: int = 1) -> int:
    found: list[int] = []

    def listening() -> bool:
        text = service.log.read_text()
        match = re.search(r"listening .*listen=127\.0\.0\.1:(\d+)", text)
        # With workers, once every one of them listens: the kernel spreads over those alone.
        if match and (workers == 1 or f"all {workers} workers serving" in text):
            found.append(int(match.group(1)))
        return bool(found)

    try:
        wait_until(service.name, listening, service.proc, service.log)
    except PeerUnavailable as exc:
        raise BenchmarkError(str(exc)) from None
    return found[0]


def ensure_installed(programs: dict[str, str], allow_install: bool) -> list[str]:
    """Install the Debian packages of missing programs; returns what was installed."""
    missing = [pkg for prog, pkg in programs.items() if shutil.which(prog) is None]
    if not missing:
        return []
    if not allow_install:
        return []
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"benchmark: not root or no apt-get: cannot install {' '.join(missing)}")
        return []
    print(f"benchmark: installing {' '.join(missing)} (apt-get install -y)", flush=True)
    env = clean_env(DEBIAN_FRONTEND="noninteractive")
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        out = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=600, check=False
        )
        if out.returncode != 0:
            print(f"benchmark: {' '.join(argv)} failed: {out.stderr.strip()[-500:]}")
            return []
    # Debian starts the freshly installed daemons; ours are private instances, stop theirs.
    for unit in ("stunnel4", "pgbouncer"):
        subprocess.run(
            ["service", unit, "stop"], capture_output=True, timeout=60, check=False, env=env
        )
    return missing


def start_stunnel(work: Path, cluster: TlsOnlyCluster) -> tuple[Service, int]:
    program = shutil.which("stunnel4") or shutil.which("stunnel")
    if program is None:
        raise PeerUnavailable("stunnel is not installed (apt-get install stunnel4)")
    port = free_port()
    conf = work / "stunnel.conf"
    conf.write_text(
        "foreground = yes\n"
        "pid =\n"
        "debug = warning\n"
        "[pgsql]\n"
        "client = yes\n"
        "protocol = pgsql\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{cluster.port}\n"
        "verifyChain = yes\n"
        f"CAfile = {cluster.ca_pem_path}\n"
        "checkHost = localhost\n"
        "sni = localhost\n"
    )
    service = spawn("stunnel", [program, str(conf)], work / "stunnel.log")
    wait_until("stunnel", port_open(port), service.proc, service.log)
    return service, port


def start_pgbouncer(work: Path, cluster: TlsOnlyCluster) -> tuple[Service, int]:
    program = shutil.which("pgbouncer")
    if program is None:
        raise PeerUnavailable("pgbouncer is not installed (apt-get install pgbouncer)")
    secret = cluster.admin_sql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{USER}'")
    peer_dir = work / "pgbouncer"
    peer_dir.mkdir()
    port = free_port()
    (peer_dir / "userlist.txt").write_text(f'"{USER}" "{secret}"\n')
    (peer_dir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"{DATABASE} = host=localhost port={cluster.port} dbname={DATABASE}\n"
        "[pgbouncer]\n"
        "listen_addr = 127.0.0.1\n"
        f"listen_port = {port}\n"
        "unix_socket_dir =\n"
        "auth_type = scram-sha-256\n"
        "auth_file = userlist.txt\n"
        "pool_mode = session\n"
        "server_lifetime = 0\n"
        "max_client_conn = 200\n"
        "default_pool_size = 50\n"
        "server_tls_sslmode = verify-full\n"
        f"server_tls_ca_file = {cluster.ca_pem_path}\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    if os.geteuid() == 0:
        ids = pwd.getpwnam("postgres")
        for path in (peer_dir, *peer_dir.iterdir()):
            os.chown(path, ids.pw_uid, ids.pw_gid)
    service = spawn(
        "pgbouncer", [program, "pgbouncer.ini"], peer_dir / "pgbouncer.log", as_user="postgres"
    )
    wait_until("pgbouncer", port_open(port), service.proc, service.log)
    return service, port


def allow_md5_role(cluster: TlsOnlyCluster) -> None:
    """An md5 role for stunnel: its pgsql mode cannot get past SCRAM-SHA-256-PLUS.

    ``pg_hba.conf`` gets one ``md5`` line for that role only, ahead of the SCRAM lines; the
    reload is asynchronous, so we wait until the role can log in.
    """
    cluster.admin_sql(
        f"SET password_encryption = 'md5'; "
        f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}';"
        f"GRANT pg_read_all_data TO {MD5_USER};"
    )
    hba = cluster.data_dir / "pg_hba.conf"
    hba.write_text(f"hostssl {DATABASE} {MD5_USER} 127.0.0.1/32 md5\n" + hba.read_text())
    cluster.admin_sql(f"GRANT ALL ON copy_in TO {MD5_USER};", dbname=DATABASE)
    cluster.admin_sql("SELECT pg_reload_conf();")
    probe = Target("direct-md5", "", cluster.port, "verify-full", MD5_USER, MD5_PASSWORD)
    deadline = time.monotonic() + START_TIMEOUT
    while (error := login_error(probe, cluster.ca_pem_path)) is not None:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"md5 role cannot log in after the hba reload: {error}")
        time.sleep(POLL)


# -- workloads ---------------------------------------------------------------------------------


@dataclass
class Sample:
    value: float  # tps, ms or MB/s
    units: int  # transactions or bytes, for CPU per unit
    cpu_s: float | None  # the proxy's CPU seconds during the run
    elapsed_s: float
    # Share of all CPUs busy during the run (everything, ours included): a sample taken while
    # something else loaded the machine shows up here, in --json.
    machine_busy: float
    # The whole machine during the run (client, server, proxy, kernel): CPU seconds and context
    # switches. A proxy's cost is not only its own CPU: it adds a hop, and every process and
    # the kernel pay for the hand-offs; these are the figures that show it.
    machine_cpu_s: float = 0.0
    context_switches: int = 0


@dataclass(frozen=True)
class MachineCounters:
    busy: int  # jiffies of all CPUs, idle and iowait excluded
    total: int
    context_switches: int

    @staticmethod
    def read() -> MachineCounters:
        """From ``/proc/stat``: the ``cpu`` line (user … steal) and ``ctxt``."""
        lines = Path("/proc/stat").read_text().splitlines()
        values = [int(v) for v in lines[0].split()[1:9]]
        ctxt = next(int(line.split()[1]) for line in lines if line.startswith("ctxt "))
        total = sum(values)
        return MachineCounters(total - values[3] - values[4], total, ctxt)


def run_checked(argv: Sequence[str], env: dict[str, str], timeout: float) -> str:
    out = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if out.returncode != 0:
        raise PeerUnavailable(" ".join((out.stderr or out.stdout).split())[-400:])
    return out.stdout


def pgbench(args: Sequence[str], seconds: int, target: Target, ca: Path) -> tuple[str, float]:
    start = time.perf_counter()
    out = run_checked(
        ["pgbench", "-n", "-S", "-T", str(seconds), *args], target.env(ca), seconds * 3 + 60
    )
    return out, time.perf_counter() - start


def parse_pgbench(output: str, key: str) -> float:
    patterns = {
        "tps": r"^tps = ([\d.]+)",
        "latency": r"^latency average = ([\d.]+) ms",
        "transactions": r"^number of transactions actually processed: (\d+)",
    }
    match = re.search(patterns[key], output, re.MULTILINE)
    if match is None:
        raise PeerUnavailable(f"no {key!r} in pgbench output: {output[-300:]}")
    return float(match.group(1))


def measure(target: Target, ca: Path, run: Callable[[], tuple[float, int, float]]) -> Sample:
    before, machine_before = target.cpu(), MachineCounters.read()
    value, units, elapsed = run()
    after, machine_after = target.cpu(), MachineCounters.read()
    cpu = None if before is None or after is None else after - before
    busy = machine_after.busy - machine_before.busy
    share = busy / max(1, machine_after.total - machine_before.total)
    switches = machine_after.context_switches - machine_before.context_switches
    return Sample(value, units, cpu, elapsed, share, busy / CLK_TCK, switches)


def workload(name: str, target: Target, ca: Path, opts: argparse.Namespace) -> Sample:
    seconds: int = opts.seconds
    env = target.env(ca)

    def select(*args: str, key: str = "tps") -> Callable[[], tuple[float, int, float]]:
        def go() -> tuple[float, int, float]:
            out, elapsed = pgbench(args, seconds, target, ca)
            return parse_pgbench(out, key), int(parse_pgbench(out, "transactions")), elapsed

        return go

    def copy_out() -> tuple[float, int, float]:
        rows = opts.copy_mb * 1024 * 1024 // COPY_ROW
        sql = (
            f"\\copy (SELECT repeat('x', {COPY_ROW - 1}) FROM generate_series(1, {rows})) "
            "TO '/dev/null'"
        )
        start = time.perf_counter()
        run_checked(["psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql], env, 600)
        elapsed = time.perf_counter() - start
        size = rows * COPY_ROW
        return size / elapsed / 1e6, size, elapsed

    def copy_in() -> tuple[float, int, float]:
        block = (b"x" * (COPY_ROW - 1) + b"\n") * (1024 * 1024 // COPY_ROW)
        with psycopg.connect(target.conninfo(ca), autocommit=True) as conn:
            conn.execute("TRUNCATE copy_in")
            start = time.perf_counter()
            with conn.cursor() as cur, cur.copy("COPY copy_in (t) FROM STDIN") as copy:
                for _ in range(opts.copy_mb):
                    copy.write(block)
            elapsed = time.perf_counter() - start
        size = len(block) * opts.copy_mb
        return size / elapsed / 1e6, size, elapsed

    runs: dict[str, Callable[[], tuple[float, int, float]]] = {
        "select_c8": select("-c", "8", "-j", "2"),
        "select_connect": select("-C", "-c", "4", "-j", "2"),
        "select_c1": select("-c", "1", key="latency"),
        "copy_out": copy_out,
        "copy_in": copy_in,
    }
    return measure(target, ca, runs[name])


# -- the run ----------------------------------------------------------------------------------


@dataclass
class Results:
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, target: str, name: str, sample: Sample) -> None:
        self.samples.setdefault(target, {}).setdefault(name, []).append(sample)

    def fail(self, target: str, name: str, reason: str) -> None:
        self.failures.setdefault(target, {})[name] = reason

    def median(self, target: str, name: str) -> float | None:
        samples = self.samples.get(target, {}).get(name)
        return statistics.median(s.value for s in samples) if samples else None

    def cpu_per_unit(self, target: str, name: str) -> float | None:
        """Median proxy CPU per transaction (µs) or per GB copied (s)."""
        samples = [s for s in self.samples.get(target, {}).get(name, []) if s.cpu_s is not None]
        if not samples:
            return None
        if name.startswith("copy"):
            return statistics.median(
                s.cpu_s / (s.units / 1e9) for s in samples if s.cpu_s is not None
            )
        return statistics.median(s.cpu_s / s.units * 1e6 for s in samples if s.cpu_s is not None)

    def machine_per_unit(self, target: str, name: str) -> tuple[float, float] | None:
        """Median whole-machine CPU (µs per transaction, s per GB) and context switches (per
        transaction, per MB)."""
        samples = [s for s in self.samples.get(target, {}).get(name, []) if s.units]
        if not samples:
            return None
        if name.startswith("copy"):  # units are bytes
            cpu = statistics.median(s.machine_cpu_s / s.units * 1e9 for s in samples)
            switches = statistics.median(s.context_switches / s.units * 1e6 for s in samples)
        else:  # units are transactions
            cpu = statistics.median(s.machine_cpu_s / s.units * 1e6 for s in samples)
            switches = statistics.median(s.context_switches / s.units for s in samples)
        return cpu, switches


def ratio(results: Results, targets: dict[str, Target], target: str, name: str) -> float | None:
    """Throughput ratio (higher is better) or latency ratio (lower is better) to direct TLS."""
    base_name = targets[target].baseline.get(name, "direct")
    value, base = results.median(target, name), results.median(base_name, name)
    if value is None or base is None or base == 0:
        return None
    return value / base


def setup_database(cluster: TlsOnlyCluster, opts: argparse.Namespace) -> None:
    cluster.create_role(USER, PASSWORD)
    cluster.create_database(DATABASE, owner=USER)
    direct = Target("direct", "", cluster.port, "verify-full")
    print(f"benchmark: pgbench -i -s {opts.scale} over direct TLS ...", flush=True)
    run_checked(
        ["pgbench", "-i", "-q", "-s", str(opts.scale)], direct.env(cluster.ca_pem_path), 1800
    )
    cluster.admin_sql(
        "CREATE UNLOGGED TABLE copy_in (t text); ALTER TABLE copy_in OWNER TO bench;"
        "VACUUM ANALYZE; SELECT count(*) FROM pgbench_accounts;",
        dbname=DATABASE,
    )


def start_targets(
    work: Path, cluster: TlsOnlyCluster, wanted: Sequence[str], opts: argparse.Namespace
) -> tuple[dict[str, Target], list[Service], list[str]]:
    """Every wanted target, ready to use; returns also services to stop and report notes."""
    ca = cluster.ca_pem_path
    targets: dict[str, Target] = {}
    services: list[Service] = []
    notes: list[str] = []
    targets["direct"] = Target(
        "direct", "libpq direct, sslmode=verify-full", cluster.port, "verify-full"
    )
    for name in SIDECAR_TARGETS:
        if name not in wanted:
            continue
        metrics = name != "sidecar-nometrics"
        tls_transport = "asyncio" if name == "sidecar-asyncio-tls" else "sidecar"
        workers = WORKERS_TARGET_PROCESSES if name == "sidecar-workers" else 1
        service = start_sidecar(
            work,
            cluster,
            metrics=metrics,
            event_loop=opts.event_loop,
            name=name,
            tls_transport=tls_transport,
            workers=workers,
        )
        services.append(service)
        port = sidecar_port(service, workers)
        description = (
            "pg-tls-sidecar, protocol metrics "
            + ("on" if metrics else "off")
            + f", {opts.event_loop} event loop"
            + (", asyncio's TLS transport" if tls_transport == "asyncio" else "")
            + (f", {workers} worker processes" if workers > 1 else "")
        )
        targets[name] = Target(name, description, port, "disable", service=service)
    compare: Path | None = opts.compare_checkout
    if compare is not None:
        service = start_sidecar(
            work,
            cluster,
            metrics=True,
            event_loop=opts.event_loop,
            name=COMPARE_TARGET,
            repo=compare,
        )
        services.append(service)
        description = (
            f"pg-tls-sidecar from {compare} ({_revision(compare)}), protocol metrics on, "
            f"{opts.event_loop} event loop"
        )
        port = sidecar_port(service)
        targets[COMPARE_TARGET] = Target(
            COMPARE_TARGET, description, port, "disable", service=service
        )
    peers = [p for p in ("stunnel", "pgbouncer") if p in wanted]
    if peers:
        programs = {"stunnel4": "stunnel4", "pgbouncer": "pgbouncer"}
        installed = ensure_installed(
            {
                k: v
                for k, v in programs.items()
                if v in {"stunnel4" if p == "stunnel" else p for p in peers}
            },
            opts.install,
        )
        if installed:
            notes.append(f"installed by the benchmark: {', '.join(installed)}")
    for peer in peers:
        try:
            if peer == "stunnel":
                service, port = start_stunnel(work, cluster)
            else:
                service, port = start_pgbouncer(work, cluster)
        except PeerUnavailable as exc:
            notes.append(f"{peer}: not run: {exc}")
            continue
        services.append(service)
        description = {
            "stunnel": "stunnel, protocol = pgsql",
            "pgbouncer": "PgBouncer, session mode, server_lifetime = 0",
        }[peer]
        targets[peer] = Target(peer, description, port, "disable", service=service)
    for target in list(targets.values()):
        error = login_error(target, ca)
        if error is None:
            continue
        if target.name == "stunnel":
            notes.append(f"stunnel with the SCRAM role fails: {error}")
            allow_md5_role(cluster)
            target.user, target.password = MD5_USER, MD5_PASSWORD
            target.description += " (md5 role)"
            targets["direct-md5"] = Target(
                "direct-md5",
                "libpq direct, sslmode=verify-full, md5 role",
                cluster.port,
                "verify-full",
                MD5_USER,
                MD5_PASSWORD,
                workloads=frozenset({"select_connect"}),
            )
            target.baseline["select_connect"] = "direct-md5"
            error = login_error(target, ca)
            if error is None:
                continue
        if target.name in ("direct", COMPARE_TARGET) or target.name in SIDECAR_TARGETS:
            raise BenchmarkError(f"{target.name}: cannot log in: {error}")
        notes.append(f"{target.name}: fails: {error}")
        del targets[target.name]
    return targets, services, notes


def run_rounds(
    targets: dict[str, Target], ca: Path, workloads: Sequence[str], opts: argparse.Namespace
) -> Results:
    results = Results()
    order = list(targets)
    for rnd in range(opts.rounds):
        rotated = order[rnd % len(order) :] + order[: rnd % len(order)]
        for name in workloads:
            for tname in rotated:
                target = targets[tname]
                if name not in target.workloads or name in results.failures.get(tname, {}):
                    continue
                try:
                    sample = workload(name, target, ca, opts)
                except (PeerUnavailable, psycopg.Error) as exc:
                    results.fail(tname, name, str(exc))
                    print(f"  round {rnd + 1} {name:15} {tname:18} fails: {exc}", flush=True)
                    continue
                results.add(tname, name, sample)
                cpu = "" if sample.cpu_s is None else f"  proxy cpu {sample.cpu_s:.2f} s"
                print(
                    f"  round {rnd + 1} {name:15} {tname:18} {sample.value:10.2f}"
                    f"  ({sample.elapsed_s:.1f} s){cpu}",
                    flush=True,
                )
    return results


# -- report -----------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(results: Results, targets: dict[str, Target], workloads: Sequence[str]) -> str:
    head = ["target", *(WORKLOAD_TITLES[w] for w in workloads)]
    head += ["proxy CPU µs/txn (-c 8)", "proxy CPU s/GB (out / in)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for tname, target in targets.items():
        if tname == "direct-md5":
            continue
        cells = [target.description]
        for w in workloads:
            failure = results.failures.get(tname, {}).get(w)
            value = results.median(tname, w)
            if failure is not None and value is None:
                cells.append("fails")
            elif value is None:
                cells.append("—")
            elif tname == "direct":
                cells.append(fmt(value, 3 if w == "select_c1" else 1))
            else:
                digits = 3 if w == "select_c1" else 1
                cells.append(f"{fmt(value, digits)} ({fmt(ratio(results, targets, tname, w))}x)")
        cells.append(fmt(results.cpu_per_unit(tname, "select_c8"), 1))
        out_gb = results.cpu_per_unit(tname, "copy_out")
        in_gb = results.cpu_per_unit(tname, "copy_in")
        cells.append("—" if out_gb is None and in_gb is None else f"{fmt(out_gb)} / {fmt(in_gb)}")
        lines.append("| " + " | ".join(cells) + " |")
    if "direct-md5" in targets:
        base = results.median("direct-md5", "select_connect")
        lines.append("")
        lines.append(
            "stunnel's `-C` ratio is against direct TLS with the same md5 role: "
            f"{fmt(base, 1)} tps."
        )
    lines += ["", *machine_markdown(results, targets, workloads)]
    return "\n".join(lines)


def machine_markdown(
    results: Results, targets: dict[str, Target], workloads: Sequence[str]
) -> list[str]:
    """Whole-machine CPU and context switches per unit of work, every process included."""
    lines = [
        "Whole machine (client, server, proxy and kernel, from `/proc/stat`): CPU and context "
        "switches per transaction (µs, cs), per GB for COPY (s, cs per MB):",
        "",
        "| target | " + " | ".join(WORKLOAD_TITLES[w].split(" (")[0] for w in workloads) + " |",
        "|" + "---|" * (len(workloads) + 1),
    ]
    for tname, target in targets.items():
        cells = [target.description]
        for w in workloads:
            figures = results.machine_per_unit(tname, w)
            if figures is None:
                cells.append("—")
                continue
            cpu, switches = figures
            unit = "s/GB" if w.startswith("copy") else "µs"
            cells.append(
                f"{fmt(cpu, 2 if w.startswith('copy') else 1)} {unit}, {fmt(switches, 1)} cs"
            )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def command_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "not installed"
    # stunnel prints its version after other lines; the program's name starts the right one.
    lines = [line.strip() for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    name = Path(argv[0]).name.rstrip("0123456789").lower()
    for line in lines:
        if line.lower().startswith(name):
            return line
    return lines[0] if lines else "unknown"


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "postgresql": command_version([str(find_bindir() / "postgres"), "--version"]),
        "psql": command_version(["psql", "--version"]),
        "psycopg_libpq": str(psycopg.pq.version()),
        "stunnel": command_version([stunnel, "-version"]) if stunnel else "not installed",
        "pgbouncer": command_version(["pgbouncer", "--version"]),
    }


def to_json(
    results: Results, targets: dict[str, Target], opts: argparse.Namespace, notes: list[str]
) -> dict[str, Any]:
    return {
        "machine": machine(),
        "command": " ".join(sys.argv),
        "options": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items() if k != "json"
        },
        "notes": notes,
        "targets": {
            tname: {
                "description": t.description,
                "workloads": {
                    w: {
                        "samples": [vars(s) for s in results.samples.get(tname, {}).get(w, [])],
                        "median": results.median(tname, w),
                        "ratio": ratio(results, targets, tname, w),
                        "baseline": t.baseline.get(w, "direct"),
                        "proxy_cpu_per_unit": results.cpu_per_unit(tname, w),
                        "proxy_cpu_unit": "s/GB" if w.startswith("copy") else "µs/txn",
                        "machine_cpu_and_switches_per_unit": results.machine_per_unit(tname, w),
                        "failure": results.failures.get(tname, {}).get(w),
                    }
                    for w in WORKLOADS
                    if w in t.workloads
                },
            }
            for tname, t in targets.items()
        },
    }


# -- main -------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmark",
        description="The sidecar against direct TLS, stunnel and PgBouncer on loopback.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="pgbench -T (default 10)")
    parser.add_argument("--copy-mb", type=int, default=300, help="MiB per COPY (default 300)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS + EXTRA_TARGETS)} "
        f"(direct is always run; the default leaves out {', '.join(EXTRA_TARGETS)})",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"subset of {','.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the sidecar's event loop (default asyncio, the stdlib loop)",
    )
    parser.add_argument(
        "--compare-checkout",
        type=Path,
        metavar="DIR",
        help="also run the sidecar from the checkout in DIR (target sidecar-compare), e.g. a "
        "git worktree of the commit before a change: before and after in one run",
    )
    parser.add_argument("--quick", action="store_true", help="1 round, 2 s, 8 MiB, scale 1")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument(
        "--no-install",
        dest="install",
        action="store_false",
        help="do not apt-get install missing stunnel4/pgbouncer",
    )
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.seconds, opts.copy_mb, opts.scale = 1, 2, 8, 1
    for key in ("rounds", "seconds", "copy_mb", "scale"):
        if getattr(opts, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1")
    if opts.compare_checkout is not None:
        opts.compare_checkout = opts.compare_checkout.resolve()
        if not (opts.compare_checkout / "proxy" / "__main__.py").is_file():
            parser.error(f"--compare-checkout {opts.compare_checkout}: no proxy package there")
    opts.targets = [t for t in opts.targets.split(",") if t]
    opts.workloads = [w for w in opts.workloads.split(",") if w]
    for kind, chosen, allowed in (
        ("target", opts.targets, ALL_TARGETS + EXTRA_TARGETS),
        ("workload", opts.workloads, WORKLOADS),
    ):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            parser.error(
                f"unknown {kind}(s) {', '.join(unknown)}; choose from {', '.join(allowed)}"
            )
    return opts


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    for tool in ("pgbench", "psql"):
        if shutil.which(tool) is None:
            print(
                f"benchmark: {tool} not found; apt-get install postgresql-client", file=sys.stderr
            )
            return 2
    work = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-bench-"))
    work.chmod(0o755)  # the server and PgBouncer run as "postgres" when we are root
    services: list[Service] = []
    cluster: TlsOnlyCluster | None = None
    started = time.monotonic()
    try:
        ca = CertificateAuthority.create(common_name="pg-tls-sidecar benchmark root CA")
        server = ca.issue_server(
            common_name="localhost", dns_names=("localhost",), ip_addresses=("127.0.0.1",)
        )
        cluster = TlsOnlyCluster(work / "pg", ca, server)
        cluster.start()
        setup_database(cluster, opts)
        targets, services, notes = start_targets(work, cluster, opts.targets, opts)
        for note in notes:
            print(f"benchmark: {note}", flush=True)
        print(
            f"benchmark: {opts.rounds} round(s) over {', '.join(targets)}; "
            f"-T {opts.seconds}, COPY {opts.copy_mb} MiB",
            flush=True,
        )
        results = run_rounds(targets, cluster.ca_pem_path, opts.workloads, opts)
        for name, failures in results.failures.items():
            for w, reason in failures.items():
                notes.append(f"{name} {w}: fails: {reason}")
        print()
        print(markdown(results, targets, opts.workloads))
        print()
        for note in notes:
            print(f"- {note}")
        print(f"\nbenchmark: finished in {time.monotonic() - started:.0f} s")
        if opts.json is not None:
            opts.json.write_text(json.dumps(to_json(results, targets, opts, notes), indent=2))
        return 0
    except BenchmarkError as exc:
        print(f"benchmark: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("benchmark: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for service in reversed(services):
            service.stop()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
