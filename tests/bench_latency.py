"""Connection latency over a real network distance: direct TLS vs the sidecar, without and with
the warm TLS pool (issue 7, deliverable 3). Not collected by pytest; needs root.

    sudo .venv/bin/python -m tests.bench_latency [--rounds 30] [--delay-ms 10] [--pool-size 4]

The TLS-only PostgreSQL runs in a network namespace of its own, reached over a point-to-point
link in a private /30 that exists only between that namespace and this host, with ``delay-ms``
added in each direction (20 ms round trip by default). The link is a veth pair with ``tc
netem`` when the kernel has netem; kernels built without it (``Specified qdisc kind is
unknown``) get a userspace delay line instead: two TUN devices and a process that holds every
IP packet ``delay-ms`` before passing it on, so TCP's own handshake pays the distance too. The
sidecars run here, in the root namespace, next to the client, as they would in a pod.

Measured: time to the first query result of a fresh connection (psycopg: connect with SCRAM,
``select 1``), for direct verify-full TLS, the sidecar without a pool and the sidecar with one.
Runs are interleaved (A B C, B C A, ...) so drift hits every variant alike; medians are printed
with their ratio to direct TLS. Target for the pool: <= 0.6x. Everything it created (namespace,
links, delay line, server, sidecars) is removed on exit, failure and Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
USER, PASSWORD, DBNAME = "app", "bench-secret-pw", "app"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


# -- the userspace delay line (a child process of this script) ----------------------------------


def delay_line(name_a: str, name_b: str, delay: float) -> None:
    """Hold every packet ``delay`` seconds between two TUN devices, in order, both ways."""
    fds = []
    for name in (name_a, name_b):
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        fds.append(fd)
    print("ready", flush=True)
    queues: dict[int, deque[tuple[float, bytes]]] = {fds[0]: deque(), fds[1]: deque()}
    peer = {fds[0]: fds[1], fds[1]: fds[0]}
    sel = selectors.DefaultSelector()
    for fd in fds:
        sel.register(fd, selectors.EVENT_READ)
    while True:
        now = time.monotonic()
        for src, queue in queues.items():
            while queue and queue[0][0] <= now:
                with contextlib.suppress(OSError):  # the other side is not up yet
                    os.write(peer[src], queue.popleft()[1])
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - time.monotonic()) if due else None
        for key, _ in sel.select(timeout):
            fd = int(key.fd)
            with contextlib.suppress(BlockingIOError):
                while True:
                    queues[fd].append((time.monotonic() + delay, os.read(fd, 65536)))


# -- the network ----------------------------------------------------------------------------------


class Network:
    """A namespace, a /30 link to it with a delay, and how to undo all of it."""

    def __init__(self, delay_ms: float) -> None:
        tag = os.getpid() % 100_000
        self.ns = f"pgtls-bench-{tag}"
        third = 64 + tag % 128  # 10.231.64.0 .. 10.231.191.252: private, per run
        self.host_addr, self.ns_addr = f"10.231.{third}.1", f"10.231.{third}.2"
        self.link_a, self.link_b = f"pgb{tag}a", f"pgb{tag}b"
        self.delay_ms = delay_ms
        self.mechanism = ""
        self._delay_proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> Network:
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        run("ip", "netns", "add", self.ns)
        self._ns("ip", "link", "set", "lo", "up")
        run("ip", "link", "add", self.link_a, "type", "veth", "peer", "name", self.link_b)
        netem = run(
            "tc", "qdisc", "add", "dev", self.link_a, "root", "netem", "delay",
            f"{self.delay_ms}ms", check=False,
        )  # fmt: skip
        if netem.returncode == 0:
            self.mechanism = f"veth + tc netem delay {self.delay_ms:g}ms each way"
            run("ip", "link", "set", self.link_b, "netns", self.ns)
            self._ns("tc", "qdisc", "add", "dev", self.link_b, "root", "netem", "delay",
                     f"{self.delay_ms}ms")  # fmt: skip
        else:
            run("ip", "link", "del", self.link_a)
            self.mechanism = (
                f"TUN pair + userspace delay line, {self.delay_ms:g} ms each way (this kernel "
                f"has no netem: {netem.stderr.strip()})"
            )
            self._delay_proc = subprocess.Popen(
                [sys.executable, __file__, "--delay-line", self.link_a, self.link_b,
                 str(self.delay_ms / 1000)],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert self._delay_proc.stdout is not None
            if self._delay_proc.stdout.readline().strip() != "ready":
                raise RuntimeError("the delay line did not start")
            run("ip", "link", "set", self.link_b, "netns", self.ns)
        run("ip", "addr", "add", self.host_addr, "peer", self.ns_addr, "dev", self.link_a)
        run("ip", "link", "set", self.link_a, "up")
        self._ns("ip", "addr", "add", self.ns_addr, "peer", self.host_addr, "dev", self.link_b)
        self._ns("ip", "link", "set", self.link_b, "up")

    def _ns(self, *argv: str) -> None:
        run("ip", "netns", "exec", self.ns, *argv)

    def close(self) -> None:
        if self._delay_proc is not None:
            self._delay_proc.terminate()
            self._delay_proc.wait(10)
            self._delay_proc = None
        run("ip", "link", "del", self.link_a, check=False)
        run("ip", "netns", "del", self.ns, check=False)

    def rtt(self, port: int, samples: int = 5) -> float:
        """Median TCP connect time to the server: one round trip."""
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            socket.create_connection((self.ns_addr, port), timeout=5).close()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


# -- the server and the sidecars ----------------------------------------------------------------


def start_cluster(net: Network, base: Path) -> object:
    from proxy.demo.cluster import TlsOnlyCluster
    from proxy.demo.pki import CertificateAuthority

    class NamespacedCluster(TlsOnlyCluster):
        """The demo cluster, run inside the namespace and reachable on its /30 address."""

        def _as_server(self, argv: object, *, pdeathsig: bool = False) -> list[str]:
            inner = super()._as_server(argv, pdeathsig=pdeathsig)  # type: ignore[arg-type]
            return ["ip", "netns", "exec", net.ns, *inner]

        def _write_conf(self) -> None:
            super()._write_conf()
            conf = self.data_dir / "tls_only.conf"
            conf.write_text(conf.read_text() + f"listen_addresses = '127.0.0.1,{net.ns_addr}'\n")
            hba = self.data_dir / "pg_hba.conf"
            hba.write_text(hba.read_text() + f"hostssl all all {net.host_addr}/32 scram-sha-256\n")

    ca = CertificateAuthority.create(common_name="bench_latency root CA")
    server = ca.issue_server(common_name="pg-bench", dns_names=(), ip_addresses=(net.ns_addr,))
    cluster = NamespacedCluster(base, ca, server)
    cluster.listen_addresses = ("127.0.0.1",)
    cluster.start()
    cluster.create_role(USER, PASSWORD)
    cluster.create_database(DBNAME, owner=USER)
    return cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sidecar:
    def __init__(self, upstream: str, base: Path, name: str, pool_size: int) -> None:
        self.admin_port = free_port()
        config = base / f"{name}.yaml"
        route: dict[str, object] = {"name": "main"}
        if pool_size:
            route["pool"] = {"size": pool_size, "max_age": 30}
        config.write_text(json.dumps({"routes": [route]}))  # JSON is YAML
        self.log = base / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        # The stdlib loop unless told otherwise (PG_TLS_SIDECAR_EVENT_LOOP=uvloop to compare).
        env["PG_TLS_SIDECAR_EVENT_LOOP"] = os.environ.get("PG_TLS_SIDECAR_EVENT_LOOP", "asyncio")
        argv = [sys.executable, "-m", "proxy", "run", "--config", str(config), "--listen",
                "127.0.0.1:0", "--upstream", upstream, "--log-format", "json",
                "--admin-listen", f"127.0.0.1:{self.admin_port}"]  # fmt: skip
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=REPO)  # fmt: skip
        deadline = time.monotonic() + 30
        self.port = 0
        while not self.port:
            for line in self.log.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if record.get("event") == "route_ready":
                        self.port = int(record["listen"].rsplit(":", 1)[1])
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sidecar {name} did not start:\n{self.log.read_text()}")
            time.sleep(0.05)  # polling its log for the readiness line, bounded above

    def metric(self, name: str, **labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics") as resp:
            text = resp.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted({"listener": "main", **labels}.items()))
        for line in text.splitlines():
            if line.startswith(f"{name}{{{want}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_pool_full(self, size: int) -> None:
        deadline = time.monotonic() + 10
        while self.metric("pg_tls_sidecar_pool_idle_connections") < size:
            if time.monotonic() > deadline:
                raise RuntimeError("the pool did not fill within 10 s")
            time.sleep(0.01)  # polling the metric before a timed run, never inside one

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the measurement ------------------------------------------------------------------------------


def first_result_seconds(conninfo: str) -> float:
    import psycopg

    t0 = time.perf_counter()
    with psycopg.connect(conninfo) as conn:
        row = conn.execute("select 1").fetchone()
        elapsed = time.perf_counter() - t0
    assert row == (1,)
    return elapsed


@contextlib.contextmanager
def terminated_cleanly() -> Iterator[None]:
    """SIGTERM/SIGHUP run the same clean-up as an exception."""

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--delay-line", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.delay_line:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        delay_line(args.delay_line[0], args.delay_line[1], float(args.delay_line[2]))
        return 0
    if os.geteuid() != 0:
        print("bench_latency needs root (network namespaces, links, qdiscs)", file=sys.stderr)
        return 2
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install iproute2", file=sys.stderr)
            return 2

    from psycopg.conninfo import make_conninfo

    base = Path(tempfile.mkdtemp(prefix="pg-tls-bench-latency-"))
    cluster = None
    sidecars: list[Sidecar] = []
    with terminated_cleanly(), Network(args.delay_ms) as net:
        try:
            cluster = start_cluster(net, base)
            port = cluster.port  # type: ignore[attr-defined]
            ca = cluster.ca_pem_path  # type: ignore[attr-defined]
            upstream = f"host={net.ns_addr} port={port} sslmode=verify-full sslrootcert={ca}"
            plain = sidecars.append
            plain(Sidecar(upstream, base, "nopool", 0))
            plain(Sidecar(upstream, base, "pool", args.pool_size))
            common = {"user": USER, "password": PASSWORD, "dbname": DBNAME,
                      "gssencmode": "disable", "connect_timeout": 10}  # fmt: skip
            variants = {
                "direct TLS": make_conninfo(
                    host=net.ns_addr,
                    port=port,
                    sslmode="verify-full",
                    sslrootcert=str(ca),
                    **common,
                ),
                "sidecar, no pool": make_conninfo(
                    host="127.0.0.1", port=sidecars[0].port, sslmode="disable", **common
                ),
                "sidecar, warm pool": make_conninfo(
                    host="127.0.0.1", port=sidecars[1].port, sslmode="disable", **common
                ),
            }
            names = list(variants)
            times: dict[str, list[float]] = {name: [] for name in names}
            for index in range(args.warmup + args.rounds):
                order = names[index % 3 :] + names[: index % 3]
                for name in order:
                    if name == "sidecar, warm pool":
                        sidecars[1].wait_pool_full(args.pool_size)
                    elapsed = first_result_seconds(variants[name])
                    if index >= args.warmup:
                        times[name].append(elapsed)
            rtt = net.rtt(port)
            hits = sidecars[1].metric("pg_tls_sidecar_pool_connections_total", result="hit")
            misses = sidecars[1].metric("pg_tls_sidecar_pool_connections_total", result="miss")
        except BaseException:
            for sc in sidecars:
                print(f"--- {sc.log}:\n{sc.log.read_text()[-3000:]}", file=sys.stderr)
            raise
        finally:
            for sc in sidecars:
                sc.stop()
            if cluster is not None:
                cluster.stop()  # type: ignore[attr-defined]
            shutil.rmtree(base, ignore_errors=True)

    print(f"link: {net.mechanism}; measured TCP round trip {rtt * 1000:.1f} ms")
    print(f"{args.rounds} interleaved rounds ({args.warmup} warm-up rounds discarded); "
          f"time to first result of a fresh connection (connect, SCRAM, select 1):")  # fmt: skip
    direct = statistics.median(times["direct TLS"])
    for name in names:
        median = statistics.median(times[name])
        low, high = min(times[name]) * 1000, max(times[name]) * 1000
        print(f"  {name:<20} median {median * 1000:7.1f} ms   ratio {median / direct:5.2f}x   "
              f"(min {low:.1f}, max {high:.1f})")  # fmt: skip
    print(f"  pool: {hits:.0f} hits, {misses:.0f} misses; target with the pool <= 0.60x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
