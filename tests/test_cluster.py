"""The test server must really behave like a TLS-only managed server.

Every sidecar test leans on this: if the cluster accepted plaintext, a sidecar that forgot to
encrypt would pass them all.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.demo.cluster import ClusterError, TlsOnlyCluster, find_bindir
from proxy.errors import ConfigError
from tests.conftest import Account, Pki, Psql, conninfo


def direct(pg: TlsOnlyCluster, account: Account, **params: object) -> str:
    return conninfo(
        host=pg.host,
        port=pg.port,
        user=account.user,
        password=account.password,
        dbname=account.dbname,
        connect_timeout=10,
        **params,
    )


def test_plaintext_tcp_is_rejected_by_pg_hba(pg: TlsOnlyCluster, app_account: Account) -> None:
    with pytest.raises(psycopg.OperationalError) as excinfo:
        psycopg.connect(direct(pg, app_account, sslmode="disable"))
    message = str(excinfo.value)
    assert 'pg_hba.conf rejects connection for host "127.0.0.1"' in message  # the reject line
    assert "no encryption" in message


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
def test_tls_connection_is_accepted_and_encrypted(
    pg: TlsOnlyCluster, app_account: Account, sslmode: str
) -> None:
    info = direct(pg, app_account, sslmode=sslmode, sslrootcert=pg.ca_pem_path)
    with psycopg.connect(info) as conn:
        row = conn.execute(
            "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()"
        ).fetchone()
        user = conn.execute("select current_user").fetchone()
    assert row is not None
    assert row[0] is True
    assert row[1] in {"TLSv1.2", "TLSv1.3"}
    assert user == (app_account.user,)


def test_verify_full_fails_against_another_ca(
    pg: TlsOnlyCluster, app_account: Account, tmp_path: Path
) -> None:
    from proxy.demo.pki import CertificateAuthority

    stranger = CertificateAuthority.create(common_name="not the server's CA")
    other_root = tmp_path / "other.pem"
    other_root.write_bytes(stranger.cert_pem())
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        psycopg.connect(direct(pg, app_account, sslmode="verify-full", sslrootcert=other_root))


def test_wrong_password_is_refused_with_scram(pg: TlsOnlyCluster, app_account: Account) -> None:
    wrong = Account(app_account.user, "not-the-password", app_account.dbname)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(direct(pg, wrong, sslmode="verify-full", sslrootcert=pg.ca_pem_path))


def test_password_is_stored_as_scram(pg: TlsOnlyCluster, app_account: Account) -> None:
    assert app_account.user == "app"
    stored = pg.admin_sql("select rolpassword from pg_authid where rolname = 'app'")
    assert stored.startswith("SCRAM-SHA-256$")


def test_server_offers_scram_plus_over_tls(pg: TlsOnlyCluster, app_account: Account) -> None:
    """Channel binding works directly: the sidecar has a -PLUS offer to strip."""
    info = (
        direct(pg, app_account, sslmode="verify-full", sslrootcert=pg.ca_pem_path)
        + " channel_binding=require"
    )
    with psycopg.connect(info) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_der_ca_file_is_the_same_ca(pg: TlsOnlyCluster, pki: Pki) -> None:
    der = pg.ca_der_path.read_bytes()
    assert pg.ca_der_path.suffix == ".cer"
    assert der[:1] == b"\x30"  # an ASN.1 SEQUENCE, not "-----BEGIN"
    from_der = x509.load_der_x509_certificate(der)
    from_pem = x509.load_pem_x509_certificate(pg.ca_pem_path.read_bytes())
    assert from_der == from_pem == pki.ca.cert
    assert from_der.public_bytes(serialization.Encoding.DER) == der


def test_libpq_cannot_read_the_der_root(
    pg: TlsOnlyCluster, app_account: Account, psql: Psql
) -> None:
    """Why the sidecar reads DER itself: libpq wants PEM, so Azure's .cer needs openssl."""
    info = conninfo(
        host="localhost",
        port=pg.port,
        user=app_account.user,
        dbname=app_account.dbname,
        sslmode="verify-full",
        sslrootcert=pg.ca_der_path,
    )
    sql = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"
    rejected = psql(info, sql, password=app_account.password)
    assert rejected.returncode == 2
    assert "could not read root certificate file" in rejected.stderr
    pem_info = info.replace(str(pg.ca_der_path), str(pg.ca_pem_path))
    assert psql(pem_info, sql, password=app_account.password) == (0, "t", "")


def test_admin_sql_raises_with_server_message(pg: TlsOnlyCluster) -> None:
    with pytest.raises(ClusterError, match='relation "no_such_table" does not exist'):
        pg.admin_sql("select * from no_such_table")


def test_connections_are_logged(pg: TlsOnlyCluster, app_account: Account) -> None:
    with psycopg.connect(direct(pg, app_account, sslmode="require")) as conn:
        pid = conn.info.backend_pid
    assert f"[{pid}]" in pg.log_text()
    assert "SSL enabled" in pg.log_text()


def test_bindir_override_must_contain_initdb(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PG_BINDIR") as excinfo:
        find_bindir({"PG_BINDIR": str(tmp_path)})
    assert str(tmp_path) in str(excinfo.value)


def test_certificate_replacement_is_seen_by_new_connections(pki: Pki) -> None:
    """A cluster of its own: the shared one must keep presenting the session certificate."""
    base = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-rotate-"))
    try:
        with TlsOnlyCluster(base, pki.ca, pki.server) as cluster:
            assert cluster.presented_certificate() == pki.server.cert_der()
            renewed = pki.ca.issue_server()
            cluster.replace_server_certificate(renewed)
            assert cluster.presented_certificate() == renewed.cert_der()
            assert cluster.running
        assert not cluster.running
        cluster.stop()  # idempotent
        assert not cluster.running
    finally:
        shutil.rmtree(base)


_CHILD = """
import sys, tempfile
from pathlib import Path
from proxy.demo.cluster import TlsOnlyCluster
from proxy.demo.pki import CertificateAuthority

ca = CertificateAuthority.create()
cluster = TlsOnlyCluster(Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-orphan-")), ca,
                         ca.issue_server())
cluster.start()
print(cluster.postmaster_pid, cluster.base_dir, flush=True)
sys.stdin.readline()  # hold the cluster until the test closes stdin or kills us
"""


@pytest.mark.parametrize("ending", ["exit_without_stop", "sigkill"])
def test_no_server_outlives_the_process_that_started_it(ending: str) -> None:
    """The finalizer covers a normal exit; the parent-death signal covers SIGKILL."""
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        pid_text, base_dir = child.stdout.readline().split()
        postmaster = os.pidfd_open(int(pid_text))  # readable once that process has exited
        try:
            if ending == "sigkill":
                child.kill()
            else:
                child.stdin.close()
            child.wait(timeout=30)
            readable, _, _ = select.select([postmaster], [], [], 30)
            assert readable == [postmaster], f"postmaster {pid_text} still running"
        finally:
            os.close(postmaster)
            child.kill()
            shutil.rmtree(base_dir)
