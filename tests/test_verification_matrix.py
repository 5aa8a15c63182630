"""The sidecar's verdict on a server certificate must be libpq's, case by case.

A table in the spirit of PostgreSQL's ``src/test/ssl``: certificates of every shape a server
may present (name forms, chains, validity, revocation, key types) times the three ``sslmode``
values times the host names that matter. The expected verdict is never written down here: for
every case ``psql`` connects straight to the same fake server with the same settings, and the
sidecar must agree with it. The only exceptions are the deliberate differences listed in
``DELIBERATE`` (and in README.md, "How the server is verified"), where the sidecar must refuse
what libpq accepts, never the other way round.

Speed: one fake TLS server per certificate and one sidecar with a route per case, all started
once; the ~250 ``psql`` runs go through a thread pool.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config import load_settings
from proxy.demo.pki import CertificateAuthority, Issued, new_key
from proxy.errors import ConfigError
from tests.conftest import RunningSidecar, client_env, conninfo
from tests.fake_servers import (
    SSL_REQUEST,
    Conn,
    FakeUpstream,
    serve_one_query_session,
    server_context,
)

MARK = "matrix-session-ok"  # what the fake server answers to a query: proof the session worked
PSQL_TIMEOUT = 30.0
POOL = 8
PRIMARY = "db.example.test"


# -- the certificates -------------------------------------------------------------------------


@dataclass(frozen=True)
class CertSpec:
    """How a server certificate is made and presented, and which CA is "its" root."""

    issuer: str  # "root", "rsa_root", "intermediate", "expired_intermediate", "other", "self"
    common_name: str | None = PRIMARY
    dns: tuple[str, ...] = (PRIMARY,)
    ips: tuple[str, ...] = ()
    key_type: str = "ec"
    send_chain: bool = True  # intermediates after the leaf, as a server should
    validity: str = "valid"  # "valid", "expired", "not_yet_valid"


CERTS: dict[str, CertSpec] = {
    # names (leaves signed directly by the root)
    "cn_only": CertSpec("root", PRIMARY, ()),
    "one_san": CertSpec("root", None, (PRIMARY,)),
    "several_wild": CertSpec("root", PRIMARY, (PRIMARY, "*.wildcard.test", "other.test")),
    "cn_not_in_san": CertSpec("root", "cn.example.test", ("san.example.test",)),
    "no_names": CertSpec("root", None, ()),
    "ipv4_cn": CertSpec("root", "192.0.2.1", ()),
    "ipv4_dns_san": CertSpec("root", None, ("192.0.2.1",)),
    "ip_sans": CertSpec(
        "root", "ip-cn.example.test", ("ip.example.test",), ("192.0.2.1", "2001:db8::1")
    ),
    # chains, validity, key types
    "rsa_leaf": CertSpec("root", key_type="rsa"),
    "rsa_root": CertSpec("rsa_root", key_type="rsa"),
    "inter_chain": CertSpec("intermediate"),
    "inter_leaf_only": CertSpec("intermediate", send_chain=False),
    "expired": CertSpec("root", validity="expired"),
    "not_yet_valid": CertSpec("root", validity="not_yet_valid"),
    "expired_intermediate": CertSpec("expired_intermediate"),
    "revoked": CertSpec("root"),
    "wrong_ca": CertSpec("other"),
    "self_signed": CertSpec("self"),
}

# Host names worth asking about, per certificate (the first one is the "right" one).
HOSTS: dict[str, tuple[str, ...]] = {
    "cn_only": (PRIMARY, "other.example.test"),
    "one_san": (PRIMARY, "example.test"),
    "several_wild": (
        PRIMARY,
        "other.test",
        "x.wildcard.test",
        "a.b.wildcard.test",
        "wildcard.test",
    ),
    "cn_not_in_san": ("san.example.test", "cn.example.test"),
    "no_names": (PRIMARY,),
    "ipv4_cn": ("192.0.2.1", "192.000.002.001"),
    "ipv4_dns_san": ("192.0.2.1", "192.000.002.001"),
    "ip_sans": (
        "192.0.2.1",
        "192.000.002.001",
        "192.0.2.2",
        "2001:db8::1",
        "2001:db8::2",
        "ip.example.test",
        "ip-cn.example.test",
    ),
}

MODES = ("require", "verify-ca", "verify-full")


@dataclass(frozen=True)
class Case:
    cert: str
    sslmode: str
    host: str = PRIMARY
    trust: str = "root"  # root | none | intermediate | bundle_last | self
    crl: str | None = None  # None | "crl" (the root's, revoking "revoked") | "crl_other"

    @property
    def id(self) -> str:
        parts = [self.cert, self.sslmode, self.host]
        if self.trust != "root":
            parts.append(f"trust={self.trust}")
        if self.crl:
            parts.append(self.crl)
        return "-".join(parts)


def _cases() -> list[Case]:
    cases = [Case(c, m, h) for c, hosts in HOSTS.items() for h in hosts for m in MODES]
    chain_certs = [c for c in CERTS if c not in HOSTS and c != "revoked"]
    cases += [Case(c, m) for c in chain_certs for m in MODES]
    cases += [Case("inter_chain", m, trust="intermediate") for m in MODES]
    cases += [Case("inter_chain", m, trust="bundle_last") for m in MODES]
    cases += [
        Case(c, m, trust="none") for c in ("self_signed", "wrong_ca", "expired") for m in MODES
    ]
    cases += [Case("self_signed", m, trust="self") for m in MODES]
    cases += [Case("revoked", m, crl="crl") for m in MODES]
    cases += [Case("one_san", m, crl="crl") for m in MODES]
    cases += [Case("one_san", m, crl="crl_other") for m in MODES]
    cases += [Case("inter_chain", m, crl="crl") for m in MODES]
    return cases


CASES = _cases()

# Cases where the sidecar is stricter than libpq on purpose: case id -> why. Each must also be a
# row of the table in README.md ("How the server is verified").
DELIBERATE: dict[str, str] = {}


def _self_signed(common_name: str, dns: tuple[str, ...]) -> Issued:
    """A self-signed leaf (not a CA), the certificate a hand-made test server often has."""
    key = new_key("ec")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert, key)


@dataclass(frozen=True)
class MatrixPki:
    directory: Path
    server_files: dict[str, tuple[Path, Path]]  # cert name -> (presented chain, key)
    anchors: dict[str, Path]  # cert name -> the root it should chain to
    files: dict[str, Path]  # intermediate, bundle_last, crl, crl_other, self.<cert>
    root: CertificateAuthority


def _build_pki(directory: Path) -> MatrixPki:
    now = dt.datetime.now(dt.UTC)
    root = CertificateAuthority.create("matrix root CA")
    cas: dict[str, CertificateAuthority] = {
        "root": root,
        "rsa_root": CertificateAuthority.create("matrix RSA root CA", key_type="rsa"),
        "intermediate": root.issue_intermediate("matrix intermediate CA"),
        "expired_intermediate": root.issue_intermediate(
            "matrix expired intermediate CA",
            not_before=now - dt.timedelta(days=60),
            not_after=now - dt.timedelta(days=1),
        ),
        "other": CertificateAuthority.create("matrix unrelated root CA"),
    }
    validity = {
        "valid": (None, None),
        "expired": (now - dt.timedelta(days=30), now - dt.timedelta(days=1)),
        "not_yet_valid": (now + dt.timedelta(days=1), now + dt.timedelta(days=30)),
    }
    server_files: dict[str, tuple[Path, Path]] = {}
    anchors: dict[str, Path] = {}
    issued: dict[str, Issued] = {}
    for name, spec in CERTS.items():
        if spec.issuer == "self":
            leaf = _self_signed(PRIMARY, (PRIMARY,))
        else:
            ca = cas[spec.issuer]
            start, end = validity[spec.validity]
            leaf = ca.issue_server(
                common_name=spec.common_name,
                dns_names=spec.dns,
                ip_addresses=spec.ips,
                key_type="rsa" if spec.key_type == "rsa" else "ec",
                not_before=start,
                not_after=end,
            )
        issued[name] = leaf
        server_files[name] = leaf.write(directory, f"server-{name}", fullchain=spec.send_chain)
        anchor = cas["rsa_root"] if spec.issuer == "rsa_root" else root
        anchors[name] = anchor.write(directory, f"anchor-{name}")
    files = {
        "intermediate": cas["intermediate"].write(directory, "only-intermediate"),
        "self": directory / "self.crt",
        "bundle_last": directory / "bundle-last.crt",
        "crl": directory / "root.crl",
        "crl_other": directory / "other.crl",
    }
    files["self"].write_bytes(issued["self_signed"].cert_pem())
    decoys = [CertificateAuthority.create(f"decoy root {i}").cert_pem() for i in range(2)]
    files["bundle_last"].write_bytes(b"".join([*decoys, root.cert_pem()]))
    files["crl"].write_bytes(root.crl([issued["revoked"]]))
    files["crl_other"].write_bytes(cas["other"].crl([issued["revoked"]]))
    return MatrixPki(directory, server_files, anchors, files, root)


def _upstream_params(case: Case, pki: MatrixPki, port: int) -> dict[str, Any]:
    """libpq parameters for this case; the same dict configures psql and the sidecar."""
    params: dict[str, Any] = {
        "host": case.host,
        "hostaddr": "127.0.0.1",
        "port": port,
        "sslmode": case.sslmode,
    }
    if case.trust == "root":
        params["sslrootcert"] = str(pki.anchors[case.cert])
    elif case.trust == "self":
        params["sslrootcert"] = str(pki.files["self"])
    elif case.trust != "none":
        params["sslrootcert"] = str(pki.files[case.trust])
    if case.crl:
        params["sslcrl"] = str(pki.files[case.crl])
    return params


# -- running psql -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    detail: str


def _psql(info: str, home: Path) -> Verdict:
    env = client_env()
    env["HOME"] = str(home)  # no ~/.postgresql/root.crt or postgresql.crt can creep in
    psql = shutil.which("psql") or "psql"
    out = subprocess.run(
        [psql, "-XAtw", "-c", "select 1", "-d", info],
        capture_output=True,
        text=True,
        env=env,
        timeout=PSQL_TIMEOUT,
        check=False,
    )
    accepted = out.returncode == 0 and out.stdout.strip() == MARK
    return Verdict(accepted, (out.stdout + out.stderr).strip())


def _fake_script(cert: Path, key: Path) -> Any:
    ctx = server_context(cert, key)

    def script(conn: Conn) -> None:
        if conn.recv_exact(8) != SSL_REQUEST:
            return
        conn.sock.sendall(b"S")
        try:
            tls_sock = conn.start_tls(ctx)
        except ssl.SSLError:
            return  # the client refused our certificate
        serve_one_query_session(tls_sock, conn, value=MARK)

    return script


@dataclass
class Matrix:
    pki: MatrixPki
    libpq: dict[Case, Verdict]
    sidecar: dict[Case, Verdict]


@pytest.fixture(scope="module")
def matrix(matrix_pki: MatrixPki) -> Iterator[Matrix]:
    if shutil.which("psql") is None:
        pytest.fail("psql not found: install the Debian package postgresql-client")
    base = Path(tempfile.mkdtemp(prefix="pg-tls-sidecar-matrix-"))
    home = base / "home"
    home.mkdir()
    try:
        pki = matrix_pki
        with contextlib.ExitStack() as stack:
            fakes = {
                name: stack.enter_context(FakeUpstream(_fake_script(*files)))
                for name, files in pki.server_files.items()
            }
            # A case the sidecar refuses to even configure is a refusal (made at start-up).
            routes, ours = [], {}
            for index, case in enumerate(CASES):
                upstream = _upstream_params(case, pki, fakes[case.cert].port)
                try:
                    load_settings(config_path=None, upstream=conninfo(**upstream), environ={})
                except ConfigError as exc:
                    ours[case] = Verdict(False, f"configuration refused: {exc}")
                    continue
                routes.append(
                    {"name": f"case{index:03d}", "listen": ["127.0.0.1:0"], "upstream": upstream}
                )
            config = base / "matrix.yaml"
            config.write_text(yaml.safe_dump({"routes": routes}))
            settings = load_settings(config_path=str(config), admin_listen="off", environ={})
            sidecar = RunningSidecar(settings).start()
            try:

                def through(index: int) -> Verdict:
                    address = sidecar.run_in_loop(
                        lambda: sidecar.sidecar.addresses(f"case{index:03d}")  # type: ignore[union-attr]
                    )[0]
                    info = conninfo(
                        host=address[0], port=address[1], user="u", dbname="d", sslmode="disable"
                    )
                    return _psql(info, home)

                def direct(case: Case) -> Verdict:
                    params = _upstream_params(case, pki, fakes[case.cert].port)
                    info = conninfo(user="u", dbname="d", gssencmode="disable", **params)
                    return _psql(info, home)

                configured = [i for i, c in enumerate(CASES) if c not in ours]
                with concurrent.futures.ThreadPoolExecutor(POOL) as pool:
                    libpq = dict(zip(CASES, pool.map(direct, CASES), strict=True))
                    for index, verdict in zip(
                        configured, pool.map(through, configured), strict=True
                    ):
                        ours[CASES[index]] = verdict
            finally:
                sidecar.stop()
            yield Matrix(pki, libpq, ours)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _by_id(case_id: str) -> Case:
    (case,) = [c for c in CASES if c.id == case_id]
    return case


def test_the_oracle_tells_cases_apart(matrix: Matrix) -> None:
    """Guards the harness: if psql refused (or accepted) everything, agreement would mean
    nothing. The control cases must go both ways."""
    assert matrix.libpq[_by_id(f"one_san-verify-full-{PRIMARY}")].accepted
    assert not matrix.libpq[_by_id(f"wrong_ca-verify-full-{PRIMARY}")].accepted
    assert matrix.libpq[_by_id(f"wrong_ca-require-{PRIMARY}-trust=none")].accepted
    accepted = sum(v.accepted for v in matrix.libpq.values())
    assert 0 < accepted < len(CASES)


# Cases where the sidecar disagrees with libpq by mistake: case id -> the defect. The test stays
# (strict xfail) so that the fix turns it green and this list must shrink with it.
DEFECTS: dict[str, str] = {}


def _params() -> list[Any]:
    return [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(strict=True, reason=DEFECTS[case.id])]
            if case.id in DEFECTS
            else [],
        )
        for case in CASES
    ]


@pytest.mark.parametrize("case", _params())
def test_sidecar_verdict_is_libpqs(matrix: Matrix, case: Case) -> None:
    libpq = matrix.libpq[case]
    ours = matrix.sidecar[case]
    if case.id in DELIBERATE:
        assert libpq.accepted, f"libpq no longer accepts this; drop it from DELIBERATE: {libpq}"
        assert not ours.accepted, ours.detail
        return
    assert ours.accepted == libpq.accepted, (
        f"libpq {'accepted' if libpq.accepted else 'refused'}: {libpq.detail!r}; "
        f"sidecar {'accepted' if ours.accepted else 'refused'}: {ours.detail!r}"
    )
    if not ours.accepted and not ours.detail.startswith("configuration refused"):
        # A refusal reaches the client as the sidecar's own ErrorResponse, not a bare EOF.
        assert "FATAL:" in ours.detail, ours.detail


# -- single cases that need their own server ----------------------------------------------------


def _refused(sidecar: RunningSidecar) -> str:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(sidecar.conninfo(user="u", dbname="d"), connect_timeout=20).close()
    return str(info.value)


def _works(sidecar: RunningSidecar) -> str:
    with psycopg.connect(sidecar.conninfo(user="u", dbname="d"), connect_timeout=20) as conn:
        row = conn.execute("select 1").fetchone()
    assert row is not None
    return str(row[0])


@pytest.fixture(scope="module")
def matrix_pki(tmp_path_factory: pytest.TempPathFactory) -> MatrixPki:
    return _build_pki(tmp_path_factory.mktemp("matrix-pki"))


def test_tls_1_1_only_server_is_refused_by_default(
    start_sidecar, matrix_pki: MatrixPki, psql
) -> None:
    """A server stuck on TLS 1.1 (possible only at OpenSSL security level 0) is refused, as by
    libpq, whose ssl_min_protocol_version default is TLSv1.2 too."""
    pki = matrix_pki
    cert, key = pki.server_files["rsa_leaf"]
    ctx = server_context(cert, key)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1_1 is deprecated
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1

    def script(conn: Conn) -> None:
        if conn.recv_exact(8) != SSL_REQUEST:
            return
        conn.sock.sendall(b"S")
        try:
            tls_sock = conn.start_tls(ctx)
        except ssl.SSLError:
            return
        serve_one_query_session(tls_sock, conn, value=MARK)

    with FakeUpstream(script) as fake:
        # Control: the fake really does complete a TLS 1.1 handshake with a willing client.
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        client.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            client.minimum_version = ssl.TLSVersion.TLSv1_1
        with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as raw:
            raw.sendall(SSL_REQUEST)
            assert raw.recv(1) == b"S"
            with client.wrap_socket(raw) as tls_sock:
                assert tls_sock.version() == "TLSv1.1"

        params = _upstream_params(Case("rsa_leaf", "verify-full"), pki, fake.port)
        direct = psql(conninfo(user="u", dbname="d", gssencmode="disable", **params), "select 1")
        assert direct.returncode != 0  # libpq refuses it as well
        sc = start_sidecar(conninfo(**params))
        message = _refused(sc)
        fake.wait_done()
    assert "TLS handshake with server" in message
    assert "TLS 1.2 and 1.3" in message or "TLSv1.2" in message
    for conn in fake.connections[1:]:
        assert bytes(conn.decrypted) == b""


def _client_cert_server(pki: MatrixPki, client_ca: CertificateAuthority) -> Any:
    cert, key = pki.server_files["one_san"]
    ctx = server_context(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=client_ca.cert_der())

    def script(conn: Conn) -> None:
        if conn.recv_exact(8) != SSL_REQUEST:
            return
        conn.sock.sendall(b"S")
        try:
            tls_sock = conn.start_tls(ctx)
        except ssl.SSLError:
            return
        peer = tls_sock.getpeercert()
        subject = dict(item for rdn in peer.get("subject", ()) for item in rdn)
        serve_one_query_session(tls_sock, conn, value=f"client={subject.get('commonName')}")

    return script


def test_client_certificate_is_presented_when_configured(
    start_sidecar, matrix_pki: MatrixPki, psql, tmp_path: Path
) -> None:
    pki = matrix_pki
    client_ca = CertificateAuthority.create("matrix client CA")
    client_cert, client_key = client_ca.issue_client("sidecar-app").write(tmp_path, "client")
    script = _client_cert_server(pki, client_ca)
    with FakeUpstream(script) as fake:
        params = _upstream_params(Case("one_san", "verify-full"), pki, fake.port)
        with_cert = dict(params, sslcert=str(client_cert), sslkey=str(client_key))
        env = {"HOME": str(tmp_path)}
        direct = psql(
            conninfo(user="u", dbname="d", gssencmode="disable", **with_cert), "select 1", env=env
        )
        assert direct.returncode == 0, direct.stderr
        assert direct.stdout == "client=sidecar-app"  # the oracle: libpq presents it

        sc = start_sidecar(conninfo(**with_cert))
        assert _works(sc) == "client=sidecar-app"

        # Without a client certificate the server's demand cannot be met: both refuse.
        direct = psql(
            conninfo(user="u", dbname="d", gssencmode="disable", **params), "select 1", env=env
        )
        assert direct.returncode != 0
        bare = start_sidecar(conninfo(**params))
        message = _refused(bare)
    assert "server" in message


def test_matrix_certificates_are_what_they_claim(matrix_pki: MatrixPki) -> None:
    """The table is only as good as its inputs: spot-check the generated chains and files."""
    pki = matrix_pki
    chain = pki.server_files["inter_chain"][0].read_bytes()
    leaf_only = pki.server_files["inter_leaf_only"][0].read_bytes()
    assert chain.count(b"BEGIN CERTIFICATE") == 2
    assert leaf_only.count(b"BEGIN CERTIFICATE") == 1
    bundle = x509.load_pem_x509_certificates(pki.files["bundle_last"].read_bytes())
    assert len(bundle) == 3 and bundle[-1] == pki.root.cert
    crl = x509.load_pem_x509_crl(pki.files["crl"].read_bytes())
    revoked = x509.load_pem_x509_certificate(pki.server_files["revoked"][0].read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    rsa = x509.load_pem_x509_certificate(pki.server_files["rsa_root"][0].read_bytes())
    assert rsa.public_key_algorithm_oid.dotted_string == "1.2.840.113549.1.1.1"
    self_signed = x509.load_pem_x509_certificate(pki.files["self"].read_bytes())
    assert self_signed.issuer == self_signed.subject
    key_pem = pki.server_files["self_signed"][1].read_bytes()
    assert serialization.load_pem_private_key(key_pem, None) is not None
    assert os.stat(pki.server_files["self_signed"][1]).st_mode & 0o077 == 0
