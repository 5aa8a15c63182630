"""One admin endpoint for several worker processes: their metrics and status documents merged.

Everything here is a pure function of texts and documents the workers already produced (the
supervisor in ``proxy.workers`` does the fetching), so each rule is tested with literal input.

How samples of the same name and labels combine (the README's "Worker processes" lists it):

- counters, histograms (every bucket, ``_sum`` and ``_count``) and summaries are added: each
  worker counted its own sessions;
- gauges are added too (``client_connections_active``, ``pool_idle_connections``, and
  ``max_connections``: every worker enforces ``limits.max_connections`` on its own, so the
  sidecar as a whole admits workers x that many, which is the figure to compare the summed
  active connections with);
- except gauges that are not amounts: ``ready`` takes the minimum (ready only if every worker
  is), ``*_info`` the maximum (value 1 whoever reports it), ``*_timestamp_seconds`` the minimum
  (the certificate that expires first is the one to alert on).

A worker that was restarted starts counting from zero. So that a merged counter never goes
down (Prometheus would read a reset, then count the returning values a second time), the
supervisor keeps the last scrape of every ended worker and adds its cumulative families
(``cumulative_only``) to the merge.
"""

from __future__ import annotations

import html
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, TypedDict

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from proxy.metrics import PREFIX
from proxy.status_page import RouteStatus, SessionSummary, StatusDoc

Combine = Callable[[float, float], float]

CUMULATIVE_TYPES: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
# Gauges that are not amounts, by family name; other gauges are added up.
GAUGE_RULES: Final[dict[str, Combine]] = {
    f"{PREFIX}ready": min,
}
MAX_RESPONSE: Final = 64 * 1024 * 1024  # a worker's /status with many thousand sessions


def combine_rule(family: Metric) -> Combine:
    """How two workers' values of one sample of ``family`` become one."""
    if family.type in CUMULATIVE_TYPES:
        return operator.add
    rule = GAUGE_RULES.get(family.name)
    if rule is not None:
        return rule
    if family.name.endswith("_info"):
        return max
    if family.name.endswith("_timestamp_seconds"):
        return min
    return operator.add


def parse_exposition(text: str) -> list[Metric]:
    """Families of a Prometheus text exposition; ``ValueError`` if it is not one."""
    return list(text_string_to_metric_families(text))


def merge_families(parts: Iterable[Sequence[Metric]]) -> list[Metric]:
    """Merge several processes' families, sample by sample (name and labels), see above.

    Families and samples keep the order in which they were first seen, so the output reads
    like one worker's. A family whose type differs from the first one seen under its name (a
    mixed-version fleet) is left out rather than mixed.
    """
    merged: dict[str, Metric] = {}
    tables: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    labels_of: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, str]] = {}
    for part in parts:
        for family in part:
            target = merged.get(family.name)
            if target is None:
                target = Metric(family.name, family.documentation, family.type, family.unit)
                merged[family.name] = target
                tables[family.name] = {}
            elif target.type != family.type:
                continue
            rule = combine_rule(family)
            table = tables[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                previous = table.get(key)
                table[key] = sample.value if previous is None else rule(previous, sample.value)
                labels_of.setdefault(key, dict(sample.labels))
    for name, target in merged.items():
        for key, value in tables[name].items():
            target.add_sample(key[0], labels_of[key], value)
    return list(merged.values())


def cumulative_only(families: Iterable[Metric]) -> list[Metric]:
    """The families that must survive their process: counters and histograms."""
    return [family for family in families if family.type in CUMULATIVE_TYPES]


def without(families: Iterable[Metric], names: Iterable[str]) -> list[Metric]:
    skip = frozenset(names)
    return [family for family in families if family.name not in skip]


class _Fixed(Collector):
    """Hands prometheus-client's writer families that already exist."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def render_exposition(families: Sequence[Metric]) -> bytes:
    """The text format, written by prometheus-client (escaping, ``_total``, ``+Inf``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(families))
    return generate_latest(registry)


# --- status


class WorkerInfo(TypedDict):
    id: int  # 1..workers, stable across restarts of that worker
    pid: int | None  # None while it is being restarted
    running: bool  # started and serving
    ready: bool | None  # its /readyz; None when it could not be asked
    restarts: int
    last_exit: int | None  # exit status of its previous process (negative: killed by signal)


class WorkerSession(SessionSummary):
    worker: int
    pid: int


class SupervisorStatus(StatusDoc):
    workers: list[WorkerInfo]


def merge_status(
    base: StatusDoc,
    workers: Sequence[WorkerInfo],
    docs: Sequence[tuple[WorkerInfo, StatusDoc]],
    *,
    scale: int,
) -> SupervisorStatus:
    """The supervisor's own facts (``base``: times, readiness, limits) with the workers' routes.

    Routes are matched by name: connection counts are added, a route's ``max_connections``
    (enforced by each worker on its own) multiplied by ``scale``, the number of workers;
    sessions are listed one after the other with their worker's number and pid (session ids
    are only unique within a worker); the TLS facts are those of the most recent handshake
    any worker made.
    """
    routes: dict[str, RouteStatus] = {}
    for info, doc in docs:
        for route in doc["routes"]:
            mine = routes.get(route["name"])
            if mine is None:
                limit = route["max_connections"]
                mine = routes[route["name"]] = RouteStatus(
                    name=route["name"],
                    listeners=route["listeners"],
                    upstream=route["upstream"],
                    server_name=route["server_name"],
                    sslmode=route["sslmode"],
                    sslrootcert=route["sslrootcert"],
                    active_connections=0,
                    max_connections=None if limit is None else limit * scale,
                    tls=route["tls"],
                    server_certificates=route["server_certificates"],
                    ca_certificates=route["ca_certificates"],
                    sessions=[],
                )
            mine["active_connections"] += route["active_connections"]
            mine["sessions"].extend(_tagged(session, info) for session in route["sessions"])
            tls, known = route["tls"], mine["tls"]
            if tls is not None and (known is None or tls["at"] > known["at"]):
                mine["tls"] = tls
                mine["server_certificates"] = route["server_certificates"]
    return SupervisorStatus(
        version=base["version"],
        generated_at=base["generated_at"],
        started_at=base["started_at"],
        uptime_seconds=base["uptime_seconds"],
        ready=base["ready"],
        reasons=base["reasons"],
        active_connections=sum(r["active_connections"] for r in routes.values()),
        max_connections=base["max_connections"],
        routes=list(routes.values()),
        workers=list(workers),
    )


def _tagged(session: SessionSummary, info: WorkerInfo) -> WorkerSession:
    return WorkerSession(
        id=session["id"],
        client=session["client"],
        user=session["user"],
        database=session["database"],
        application=session["application"],
        age_seconds=session["age_seconds"],
        bytes_client_to_server=session["bytes_client_to_server"],
        bytes_server_to_client=session["bytes_server_to_client"],
        worker=info["id"],
        pid=info["pid"] or 0,
    )


def workers_html(workers: Sequence[WorkerInfo]) -> str:
    """A section for the status page: which worker runs as which pid, and how it is doing."""
    rows = []
    for info in workers:
        state = "running" if info["running"] else "restarting"
        ready = {True: "ready", False: "not ready", None: "unknown"}[info["ready"]]
        last = "" if info["last_exit"] is None else str(info["last_exit"])
        cells = (info["id"], info["pid"] or "", state, ready, info["restarts"], last)
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{name}</th>" for name in ("Worker", "Pid", "State", "Ready", "Restarts", "Last exit")
    )
    return (
        f"<section><h2>Worker processes</h2><table><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def add_section(page: str, section: str) -> str:
    """``section`` inserted at the end of the status page's body."""
    at = page.rfind("</body>")
    return page + section if at < 0 else page[:at] + section + page[at:]


# --- the workers' answers


def parse_http_response(data: bytes) -> tuple[int, bytes]:
    """``(status, body)`` of one complete HTTP/1.1 answer read until the peer closed.

    The workers' endpoint is ``proxy.admin``: one answer per connection, with
    ``Content-Length``. ``ValueError`` when the bytes are not such an answer.
    """
    head, separator, body = data.partition(b"\r\n\r\n")
    if not separator:
        raise ValueError("the answer ended inside its head")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0][:80]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
            if len(body) < length:
                raise ValueError(f"the body ended after {len(body)} of {length} bytes")
            body = body[:length]
    return int(parts[1]), body
