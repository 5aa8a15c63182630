"""Metrics: real registries read back with get_sample_value, real certificates, real promtool."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from proxy.demo.pki import CertificateAuthority
from proxy.errors import UPSTREAM_ERROR_REASONS
from proxy.metrics import (
    CONNECTION_RESULTS,
    PREFIX,
    REJECT_REASONS,
    SERVER_ERROR_SEVERITIES,
    SQLSTATE_CLASSES,
    Histogram,
    Metrics,
)

NOW = datetime.now(UTC).replace(microsecond=0)


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(PREFIX + name, labels)


def sample_names(metrics: Metrics) -> set[str]:
    return {sample.name for family in metrics.registry.collect() for sample in family.samples}


# --- Histogram


def test_histogram_buckets_are_less_than_or_equal() -> None:
    histogram = Histogram((0.1, 1.0, 10.0))
    for observed in (0.05, 0.1, 0.5, 1.0, 10.0, 11.0, 1e9):
        histogram.observe(observed)
    assert histogram.counts == [2, 2, 1, 2]  # <=0.1, <=1, <=10, +Inf
    assert histogram.count == 7
    assert histogram.sum == pytest.approx(0.05 + 0.1 + 0.5 + 1.0 + 10.0 + 11.0 + 1e9)
    assert histogram.cumulative() == [("0.1", 2.0), ("1.0", 4.0), ("10.0", 5.0), ("+Inf", 7.0)]


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0)], ids=["empty", "dup", "order"])
def test_histogram_bounds_must_increase(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing and unique"):
        Histogram(bounds)


def test_histograms_are_exported_cumulatively() -> None:
    metrics = Metrics("1.2.3", ["main"])
    stats = metrics.route("main")
    for seconds in (0.004, 0.02, 0.02, 12.0):
        stats.connect_seconds.observe(seconds)
    name = "upstream_connect_duration_seconds"
    assert value(metrics, f"{name}_bucket", listener="main", le="0.005") == 1
    assert value(metrics, f"{name}_bucket", listener="main", le="0.025") == 3
    assert value(metrics, f"{name}_bucket", listener="main", le="10.0") == 3
    assert value(metrics, f"{name}_bucket", listener="main", le="+Inf") == 4
    assert value(metrics, f"{name}_count", listener="main") == 4
    assert value(metrics, f"{name}_sum", listener="main") == pytest.approx(12.044)


# --- every series exists from the start


def test_every_label_set_is_pre_initialised_with_zero() -> None:
    metrics = Metrics("1.2.3", ["a", "b"])
    for listener in ("a", "b"):
        for result in CONNECTION_RESULTS:
            assert value(metrics, "client_connections_total", listener=listener, result=result) == 0
        for reason in REJECT_REASONS:
            assert (
                value(metrics, "connections_rejected_total", listener=listener, reason=reason) == 0
            )
        for reason in UPSTREAM_ERROR_REASONS:
            assert value(metrics, "upstream_errors_total", listener=listener, reason=reason) == 0
        for direction in ("client_to_server", "server_to_client"):
            assert value(metrics, "bytes_total", listener=listener, direction=direction) == 0
        for outcome in ("commit", "rollback"):
            assert value(metrics, "transactions_total", listener=listener, outcome=outcome) == 0
        for severity in SERVER_ERROR_SEVERITIES:
            for cls in SQLSTATE_CLASSES:
                assert (
                    value(
                        metrics,
                        "server_errors_total",
                        listener=listener,
                        severity=severity,
                        sqlstate_class=cls,
                    )
                    == 0
                )
        for name in ("client_connections_active", "queries_total", "notices_total"):
            assert value(metrics, name, listener=listener) == 0
        for name in (
            "upstream_connect_duration_seconds",
            "upstream_tls_handshake_duration_seconds",
            "session_duration_seconds",
            "query_duration_seconds",
        ):
            assert value(metrics, f"{name}_count", listener=listener) == 0
            assert value(metrics, f"{name}_bucket", listener=listener, le="+Inf") == 0
    for result in ("success", "failure"):
        assert value(metrics, "config_reloads_total", result=result) == 0
    assert value(metrics, "build_info", version="1.2.3") == 1


def test_nothing_about_tls_before_a_handshake() -> None:
    names = sample_names(Metrics("1.2.3", ["a"]))
    assert PREFIX + "upstream_tls_info" not in names
    assert PREFIX + "upstream_certificate_expiry_timestamp_seconds" not in names
    assert PREFIX + "ca_certificate_expiry_timestamp_seconds" not in names


# --- values


def test_counters_read_back_per_route() -> None:
    metrics = Metrics("1.2.3", ["main", "reporting"])
    main = metrics.route("main")
    main.connections["ok"] += 3
    main.connections["upstream_error"] += 1
    main.active = 2
    main.rejected["limit"] += 4
    main.upstream_errors["tls_verify_failed"] += 1
    main.bytes_client_to_server += 1000
    main.bytes_server_to_client += 5_000_000_000  # beyond 32 bits
    main.queries += 7
    main.notices += 2
    main.transactions["commit"] += 5
    main.transactions["rollback"] += 1
    main.query_seconds.observe(0.003)
    main.session_seconds.observe(42.0)
    metrics.config_reloads["failure"] += 1

    assert value(metrics, "client_connections_total", listener="main", result="ok") == 3
    assert value(metrics, "client_connections_total", listener="main", result="upstream_error") == 1
    assert value(metrics, "client_connections_active", listener="main") == 2
    assert value(metrics, "connections_rejected_total", listener="main", reason="limit") == 4
    assert value(metrics, "upstream_errors_total", listener="main", reason="tls_verify_failed") == 1
    assert value(metrics, "bytes_total", listener="main", direction="client_to_server") == 1000
    assert (
        value(metrics, "bytes_total", listener="main", direction="server_to_client")
        == 5_000_000_000
    )
    assert value(metrics, "queries_total", listener="main") == 7
    assert value(metrics, "notices_total", listener="main") == 2
    assert value(metrics, "transactions_total", listener="main", outcome="commit") == 5
    assert value(metrics, "transactions_total", listener="main", outcome="rollback") == 1
    assert value(metrics, "query_duration_seconds_bucket", listener="main", le="0.005") == 1
    assert value(metrics, "session_duration_seconds_bucket", listener="main", le="60.0") == 1
    assert value(metrics, "session_duration_seconds_bucket", listener="main", le="10.0") == 0
    assert value(metrics, "config_reloads_total", result="failure") == 1
    # The other route saw none of it.
    assert value(metrics, "client_connections_total", listener="reporting", result="ok") == 0
    assert value(metrics, "queries_total", listener="reporting") == 0


@pytest.mark.parametrize(
    ("severity", "sqlstate", "expected"),
    [
        ("ERROR", "42P01", ("ERROR", "42")),  # undefined_table
        ("FATAL", "28P01", ("FATAL", "28")),  # invalid_password
        ("ERROR", "40001", ("ERROR", "40")),  # serialization_failure
        ("PANIC", "XX000", ("PANIC", "XX")),
        ("ERROR", "ZZ999", ("ERROR", "XX")),  # a class PostgreSQL does not define
        ("ERROR", "", ("ERROR", "XX")),
        ("ERROR", "4", ("ERROR", "XX")),
        ("FEHLER", "22012", ("OTHER", "22")),  # a localised severity is not a label value
        ("ERROR", "01000", ("ERROR", "XX")),  # a warning class is not an error class
    ],
)
def test_server_errors_stay_in_the_fixed_label_set(
    severity: str, sqlstate: str, expected: tuple[str, str]
) -> None:
    metrics = Metrics("1.2.3", ["main"])
    metrics.route("main").server_error(severity, sqlstate)
    labels = {"listener": "main", "severity": expected[0], "sqlstate_class": expected[1]}
    assert value(metrics, "server_errors_total", **labels) == 1
    assert total_server_errors(metrics) == 1


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (("ERROR", "23"), ("ERROR", "23")),
        (("OTHER", "42"), ("OTHER", "42")),
        (("ERROR", "ZZ"), ("ERROR", "XX")),
        (("<b>", "\\n"), ("OTHER", "XX")),
    ],
)
def test_keys_added_by_the_scanner_are_folded_into_the_fixed_set(
    key: tuple[str, str], expected: tuple[str, str]
) -> None:
    """The message scanner adds to ``server_errors`` with ``dict.get(key, 0) + 1``."""
    metrics = Metrics("1.2.3", ["main"])
    errors = metrics.route("main").server_errors
    errors[key] = errors.get(key, 0) + 2
    errors["FATAL", "57"] += 1
    labels = {"listener": "main", "severity": expected[0], "sqlstate_class": expected[1]}
    assert value(metrics, "server_errors_total", **labels) == 2
    assert (
        value(
            metrics, "server_errors_total", listener="main", severity="FATAL", sqlstate_class="57"
        )
        == 1
    )
    assert total_server_errors(metrics) == 3


def total_server_errors(metrics: Metrics) -> float:
    family = next(f for f in metrics.registry.collect() if f.name == PREFIX + "server_errors")
    return sum(sample.value for sample in family.samples)


def test_tls_info() -> None:
    metrics = Metrics("1.2.3", ["main"])
    metrics.route("main").tls = ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert (
        value(
            metrics,
            "upstream_tls_info",
            listener="main",
            version="TLSv1.3",
            cipher="TLS_AES_256_GCM_SHA384",
        )
        == 1
    )


# --- certificates


@pytest.fixture(scope="module")
def chain() -> tuple[x509.Certificate, ...]:
    """As get_verified_chain gives it: leaf (20 days), issuing CA (90 days), intermediate
    (60 days), and the self-signed root last (10 years). Not a chain OpenSSL would accept
    (pathlen), which does not matter for reading expiry dates."""
    root = CertificateAuthority.create("Metrics Test Root", not_after=NOW + timedelta(days=3650))
    middle = root.issue_intermediate("Metrics Intermediate", not_after=NOW + timedelta(days=60))
    issuing = middle.issue_intermediate("Metrics Issuing CA", not_after=NOW + timedelta(days=90))
    leaf = issuing.issue_server(not_after=NOW + timedelta(days=20)).cert
    return leaf, issuing.cert, middle.cert, root.cert


def test_upstream_certificate_expiry(chain: tuple[x509.Certificate, ...]) -> None:
    metrics = Metrics("1.2.3", ["main"])
    metrics.route("main").upstream_chain = chain
    name = "upstream_certificate_expiry_timestamp_seconds"
    assert (
        value(metrics, name, listener="main", position="leaf")
        == (NOW + timedelta(days=20)).timestamp()
    )
    # The soonest intermediate, not the root (roots come from the configured CA certificates).
    assert (
        value(metrics, name, listener="main", position="intermediate")
        == (NOW + timedelta(days=60)).timestamp()
    )


def test_a_leaf_signed_by_the_root_has_no_intermediate_series() -> None:
    root = CertificateAuthority.create("Direct Root")
    leaf = root.issue_server().cert
    metrics = Metrics("1.2.3", ["main"])
    metrics.route("main").upstream_chain = (leaf, root.cert)
    name = "upstream_certificate_expiry_timestamp_seconds"
    assert value(metrics, name, listener="main", position="leaf") is not None
    assert value(metrics, name, listener="main", position="intermediate") is None


def test_ca_certificate_expiry_by_subject() -> None:
    expired = datetime(2025, 5, 12, 23, 59, tzinfo=UTC)
    baltimore = CertificateAuthority.create(
        "Baltimore CyberTrust Root", not_before=expired - timedelta(days=9000), not_after=expired
    ).cert
    g2 = CertificateAuthority.create(
        "DigiCert Global Root G2", not_after=NOW + timedelta(days=4000)
    ).cert
    g2_older = CertificateAuthority.create(
        "DigiCert Global Root G2", not_after=NOW + timedelta(days=100)
    ).cert
    metrics = Metrics("1.2.3", ["main"])
    metrics.route("main").ca_certificates = (baltimore, g2_older, g2)
    name = "ca_certificate_expiry_timestamp_seconds"
    assert value(metrics, name, listener="main", subject="CN=Baltimore CyberTrust Root") == (
        expired.timestamp()
    )
    # Two roots with one subject: one series, the later expiry.
    assert (
        value(metrics, name, listener="main", subject="CN=DigiCert Global Root G2")
        == (NOW + timedelta(days=4000)).timestamp()
    )


# --- the registry


def test_registries_are_independent() -> None:
    first, second = Metrics("1.2.3", ["main"]), Metrics("1.2.3", ["main"])
    first.route("main").queries += 1
    assert value(first, "queries_total", listener="main") == 1
    assert value(second, "queries_total", listener="main") == 0


def test_set_routes_keeps_counters_of_routes_that_stay() -> None:
    metrics = Metrics("1.2.3", ["a", "b"])
    a, b = metrics.route("a"), metrics.route("b")
    a.queries += 5
    metrics.set_routes(["a", "c"])
    assert metrics.route("a") is a
    assert value(metrics, "queries_total", listener="a") == 5
    assert value(metrics, "queries_total", listener="c") == 0
    assert value(metrics, "queries_total", listener="b") is None
    with pytest.raises(KeyError):
        metrics.route("b")
    b.queries += 1  # a session still running on a removed route does not break anything
    assert list(metrics.routes) == ["a", "c"]


def test_route_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        Metrics("1.2.3", ["a", "a"])


def test_exposition_is_the_classic_text_format() -> None:
    metrics = Metrics("1.2.3", ["main"])
    body, content_type = metrics.exposition()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    assert "# TYPE pg_tls_sidecar_client_connections_total counter" in text
    assert 'pg_tls_sidecar_build_info{version="1.2.3"} 1.0' in text
    assert "_created" not in text  # no per-series creation timestamps to confuse readers


def test_every_metric_has_help_that_says_what_to_watch() -> None:
    metrics = Metrics("1.2.3", ["main"])
    families = list(metrics.registry.collect())
    assert len(families) == 20  # ready and max_connections need an application state source
    for family in families:
        assert family.name.startswith(PREFIX)
        assert len(family.documentation) > 30, family.name


# --- promtool


def populated(version: str = "1.2.3") -> Metrics:
    """Every family with samples, and label values that need escaping."""
    metrics = Metrics(version, ["main", "odd.route-name_2"])
    root = CertificateAuthority.create('Root "quoted" \\ back\\slash')
    issuing = root.issue_intermediate("Issuing CA")
    leaf = issuing.issue_server().cert
    for name in ("main", "odd.route-name_2"):
        stats = metrics.route(name)
        stats.connections["ok"] += 1
        stats.connect_seconds.observe(0.01)
        stats.tls_handshake_seconds.observe(0.02)
        stats.session_seconds.observe(3.0)
        stats.query_seconds.observe(0.001)
        stats.server_error("ERROR", "42601")
        stats.server_error("FEHLER", "22012")
        stats.tls = ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
        stats.upstream_chain = (leaf, issuing.cert)
        stats.ca_certificates = (root.cert,)
    metrics.config_reloads["success"] += 1
    return metrics


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus; ./dev installs it)")
    return path


def test_promtool_accepts_the_exposition() -> None:
    body, _ = populated().exposition()
    subjects = {
        sample.labels["subject"]
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if "subject" in sample.labels
    }
    assert subjects == {'CN=Root \\"quoted\\" \\\\ back\\\\slash'}  # RFC 4514, round-tripped
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout == b""  # no lint findings either
    assert result.stderr == b""


def test_promtool_rejects_a_broken_exposition() -> None:
    """The check above can fail: promtool does complain about a bad counter name."""
    body, _ = populated().exposition()
    broken = body.replace(b"pg_tls_sidecar_queries_total", b"pg_tls_sidecar_queries")
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=broken, capture_output=True, timeout=60, check=False
    )
    assert result.returncode != 0
    assert b"_total" in result.stdout + result.stderr
