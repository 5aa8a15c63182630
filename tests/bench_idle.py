"""Memory per idle session: N sessions held open through a sidecar subprocess (issue 7).

    .venv/bin/python -m tests.bench_idle [--sessions 1000] [--event-loop asyncio|uvloop]

Starts the TLS-only PostgreSQL with room for N backends, the sidecar as a subprocess (so its RSS
is its own), logs N psycopg sessions in through it (SCRAM, one query each) and keeps them idle,
then reports the sidecar's VmRSS growth divided by N. Not collected by pytest: a measurement,
not a pass/fail test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import psycopg

from proxy.demo.cluster import TlsOnlyCluster
from proxy.demo.pki import CertificateAuthority

USER, PASSWORD = "idle", "idle-bench-pw"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    opts = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-idle-"))
    ca = CertificateAuthority.create("idle-bench root")
    cluster = TlsOnlyCluster(base, ca, ca.issue_server())
    proc: subprocess.Popen[str] | None = None
    conns: list[psycopg.Connection[tuple[object, ...]]] = []
    try:
        cluster.start()
        cluster.admin_sql(f"alter system set max_connections = {opts.sessions + 50}")
        cluster.stop()
        cluster.start()
        cluster.create_role(USER, PASSWORD)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        config = base / "sidecar.yaml"  # the default limit (200) would refuse the rest
        config.write_text(f"limits: {{max_connections: {opts.sessions + 10}}}\n")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy",
                "run",
                "--config",
                str(config),
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "off",
                "--event-loop",
                opts.event_loop,
                "--log-format",
                "json",
                "--upstream",
                f"host=localhost port={cluster.port} sslrootcert={cluster.ca_pem_path}",
            ],
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            doc = json.loads(line)
            if doc.get("event") == "route_ready":
                port = int(doc["listen"].rsplit(":", 1)[1])
                break
        # Keep draining the log: a sidecar blocked on a full stderr pipe stalls every session.
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        info = (
            f"host=127.0.0.1 port={port} user={USER} password={PASSWORD} "
            "dbname=postgres sslmode=disable connect_timeout=20"
        )
        with psycopg.connect(info) as warm:  # warm-up: imports, first TLS context use
            warm.execute("select 1")
        before = _rss(proc.pid)
        print(f"sidecar on port {port}; opening {opts.sessions} sessions", flush=True)
        for i in range(opts.sessions):
            if i and i % 200 == 0:
                print(
                    f"  {i} sessions open, sidecar RSS {_rss(proc.pid) / 2**20:.1f} MiB", flush=True
                )
            conn = psycopg.connect(info, autocommit=True)
            conn.execute("select 1")
            conns.append(conn)
        after = _rss(proc.pid)
        per = (after - before) / opts.sessions
        print(
            f"{opts.sessions} idle sessions on the {opts.event_loop} loop: sidecar RSS "
            f"{before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB, "
            f"{per / 1024:.1f} KiB per idle session"
        )
        return 0
    finally:
        for conn in conns:
            conn.close()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            if proc.stderr is not None:
                proc.stderr.close()
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
