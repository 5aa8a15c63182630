"""``pg-tls-sidecar demo``: the whole story in one command, on one machine, in a few seconds.

A reader of the README should see the problem and the fix with their own eyes, not take them on
trust: a server configured like Azure Database for PostgreSQL refuses a plaintext ``psql``, and
the same ``psql`` with ``sslmode=disable`` gets in through the sidecar while the server reports
the session as TLS. Everything is throwaway (CA, server, password) and removed on exit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from proxy.demo.cluster import TlsOnlyCluster
from proxy.demo.pki import CertificateAuthority
from proxy.errors import SidecarError

DEMO_USER: Final = "demo"
DEMO_PASSWORD: Final = "demo-password"  # noqa: S105 -- throwaway, dies with the demo
DEMO_DB: Final = "demo"
STAT_SSL: Final = "select ssl, version, cipher from pg_stat_ssl where pid = pg_backend_pid()"
PSQL_TIMEOUT: Final = 30.0
DRAIN_SECONDS: Final = 5.0
STEPS: Final = 5


class DemoFailed(Exception):
    """A step did not show what it should; the message says which and why."""


class Narrator:
    """Numbered steps with indented explanations, so the output reads top to bottom."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.step = 0

    def title(self, text: str) -> None:
        self._print(f"\n{text}\n{'=' * len(text)}\n")

    def begin(self, text: str) -> None:
        self.step += 1
        self._print(f"[{self.step}/{STEPS}] {text}")

    def say(self, text: str = "") -> None:
        self._print(f"      {text}" if text else "")

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


def main(once: bool) -> int:
    """Runs the demo; with ``once`` exits after showing it, else serves until Ctrl-C/SIGTERM."""
    out = Narrator(sys.stdout)
    out.title("pg-tls-sidecar demo")
    base = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-demo-"))
    cluster: TlsOnlyCluster | None = None
    keep_dir = False
    try:
        out.begin("A throwaway certificate authority signs the server's certificate.")
        ca = CertificateAuthority.create(common_name="pg-tls-sidecar demo root CA")
        server = ca.issue_server()
        out.say(f"CA: {ca.cert.subject.rfc4514_string()}; server certificate for localhost")

        out.begin("A local PostgreSQL configured like Azure Database for PostgreSQL.")
        started = time.monotonic()
        cluster = TlsOnlyCluster(base, ca, server)
        cluster.start()
        cluster.create_role(DEMO_USER, DEMO_PASSWORD)
        cluster.create_database(DEMO_DB, owner=DEMO_USER)
        version = cluster.admin_sql("show server_version")
        out.say(
            f"PostgreSQL {version} on {cluster.host}:{cluster.port}, "
            f"ready in {time.monotonic() - started:.1f} s"
        )
        out.say("pg_hba.conf: hostssl ... scram-sha-256, hostnossl ... reject (TLS or nothing)")

        out.begin("The CA certificate, written as DER, is all the sidecar needs to trust:")
        out.say(str(cluster.ca_der_path))
        out.say("this is the file Azure users download; no OpenSSL conversion")
        return asyncio.run(_with_sidecar(cluster, once, out))
    except (DemoFailed, SidecarError, OSError) as exc:
        out.say()
        out.say(f"DEMO FAILED: {exc}")
        if cluster is not None:
            out.say(f"server log: {cluster.log_path} (kept)")
            keep_dir = True
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if cluster is not None:
            cluster.stop()
        if not keep_dir:
            shutil.rmtree(base, ignore_errors=True)


async def _with_sidecar(cluster: TlsOnlyCluster, once: bool, out: Narrator) -> int:
    from proxy.app import Sidecar
    from proxy.config import load_settings
    from proxy.logs import configure_logging

    configure_logging("text", "WARNING")  # the narration is the output; problems still show
    psql = str(cluster.psql_path)

    out.begin("psql straight to the server, without TLS (sslmode=disable):")
    direct = (
        f"host={cluster.host} port={cluster.port} user={DEMO_USER} dbname={DEMO_DB} sslmode=disable"
    )
    code, _, err = await _psql(psql, direct, "select 1")
    if code == 0:
        raise DemoFailed("the server accepted a plaintext connection; it should refuse it")
    out.say("refused, as Azure refuses it:")
    out.say(_first_line(err))

    upstream = f"host=localhost port={cluster.port} sslrootcert={cluster.ca_der_path}"
    # Free ports for both listeners: the demo must not collide with a sidecar already running.
    settings = load_settings(
        config_path=None,
        listen=["127.0.0.1:0"],
        upstream=upstream,
        admin_listen="127.0.0.1:0",
        environ={},
    )
    sidecar = Sidecar(settings)
    await sidecar.start()
    try:
        host, port = next(a for a in sidecar.addresses() if isinstance(a, tuple))
        out.begin(f"The sidecar listens on {host}:{port} and forwards over TLS:")
        out.say(f"upstream = {upstream}")
        out.say("(sslmode is verify-full by default: chain to ca.cer, and the name localhost)")
        if sidecar.admin is not None:
            admin_host, admin_port = sidecar.admin.address
            out.say(f"status page: http://{admin_host}:{admin_port}/status, metrics: /metrics")
        out.say()
        out.say("the same psql with sslmode=disable, through the sidecar:")
        local = f"host={host} port={port} user={DEMO_USER} dbname={DEMO_DB} sslmode=disable"
        code, stdout, err = await _psql(psql, local, STAT_SSL)
        if code != 0:
            raise DemoFailed(f"psql through the sidecar failed: {err.strip()}")
        ssl_on, tls_version, cipher = [*stdout.strip().split("|"), "", "", ""][:3]
        if ssl_on != "t":
            raise DemoFailed(f"the server did not see TLS (pg_stat_ssl says {stdout.strip()!r})")
        out.say(f"connected; the server saw ssl={ssl_on} version={tls_version} cipher={cipher}")
        out.say("plaintext only on this machine's loopback; verified TLS on the way out")
        out.say()
        if once:
            out.say("Demo complete.")
            return 0
        out.say("Try it yourself (Ctrl-C to stop):")
        out.say(f'  PGPASSWORD={DEMO_PASSWORD} psql "{local}"')
        await _until_signalled()
        out.say("stopping: draining the sidecar, then the server")
        return 0
    finally:
        await sidecar.shutdown(drain=DRAIN_SECONDS)


async def _psql(psql: str, conninfo: str, sql: str) -> tuple[int, str, str]:
    """psql as a user would run it; the password in the environment, not on the command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=DEMO_PASSWORD, PGCONNECT_TIMEOUT="10", PGPASSFILE=os.devnull)
    proc = await asyncio.create_subprocess_exec(
        psql,
        "-XAt",
        "-d",
        conninfo,
        "-c",
        sql,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), PSQL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise DemoFailed(f"psql did not finish within {PSQL_TIMEOUT:.0f} s") from None
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def _first_line(text: str) -> str:
    """psql's error, without the ``psql: error: connection to server ... failed:`` preamble."""
    line = next((ln for ln in text.splitlines() if ln.strip()), "(no message)")
    _, sep, rest = line.partition("failed: ")
    return rest if sep else line


async def _until_signalled(
    signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
