"""The container image and deployment files, validated with the tools that consume them.

No container engine runs on the test machines, so each file is checked by what can check it
for real: hadolint for the Dockerfile; the Dockerfile's own build steps, ENV, ENTRYPOINT and
CMD replayed in a fresh virtual environment against the test cluster; kustomize (kubectl's)
and the Kubernetes JSON schemas for the manifests; promtool for the alert rules, their unit
tests, the compose Prometheus configuration and every query of the dashboard; the Compose
specification's schema for the compose file. The Dockerfile is parsed, never restated here,
so a change to it is a change to what these tests run.
"""

from __future__ import annotations

import fnmatch
import json
import os
import queue
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

import proxy
from proxy.config import load_settings
from proxy.demo.cluster import TlsOnlyCluster
from proxy.errors import ConfigError
from proxy.settings import TcpListen
from tests.conftest import APP, Psql, client_env, conninfo

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "pg-tls-sidecar.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "pg-tls-sidecar.rules.test.yml"
DASHBOARD = DEPLOY / "prometheus" / "grafana-dashboard.json"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
K8S_VERSION = "1.33.0"  # native sidecars are on by default from 1.29, GA in 1.33
SIDECAR = "pg-tls-sidecar"
TOOL_TIMEOUT = 120
INSTALL_TIMEOUT = 600  # downloads the dependencies from the package index, as docker build does
PROCESS_TIMEOUT = 60


def tool(name: str) -> str:
    """A dev dependency's binary: next to this interpreter (the virtualenv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev dependencies (./dev setup)")
    return found


def run_tool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
    )


# -- the Dockerfile, parsed ----------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str]:
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON) form: {self.args}"
        return [str(item) for item in value]


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name}, got {len(found)}"
        return found[0]

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for inst in self.all("ENV"):
            for item in shlex.split(inst.args):
                key, _, value = item.partition("=")
                out[key] = value
        return out


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def build(self) -> Stage:
        return self.stages[0]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions with continuation lines joined and comments dropped; ARGs before FROM."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages and keyword == "ARG":
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append(Instruction(keyword, rest.strip()))
    return Dockerfile(args, stages)


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile(ROOT / "Dockerfile")


def test_hadolint_finds_nothing() -> None:
    result = run_tool(tool("hadolint"), "--failure-threshold", "info", str(ROOT / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_stages_use_one_exactly_pinned_python(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) == 2
    assert all(stage.base == "${PYTHON_IMAGE}" for stage in dockerfile.stages)
    image = dockerfile.args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", image), image
    labels = dockerfile.final.one("LABEL").args
    assert f'org.opencontainers.image.base.name="{image.split("@")[0]}"' in labels


def test_final_stage_runs_unprivileged_and_stops_cleanly(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    user = final.one("USER").args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), user  # numeric: runAsNonRoot
    assert final.one("STOPSIGNAL").args == "SIGTERM"
    # The drain must end before a SIGKILL after Kubernetes' default 30 s grace period.
    config = yaml.safe_load((DEPLOY / "container" / "sidecar.yaml").read_text())
    assert config["timeouts"]["drain"] < 30
    # No installer and no compiler reach the final image.
    run = " ".join(i.args for i in final.all("RUN"))
    assert "pip uninstall" in run and "apt-get" not in run
    assert "--without-pip" in " ".join(i.args for i in dockerfile.build.all("RUN"))
    assert final.env()["PYTHONDONTWRITEBYTECODE"] == "1"  # read-only root filesystem


def test_labels_carry_the_package_version(dockerfile: Dockerfile) -> None:
    versions = [i.args for i in dockerfile.final.all("ARG") if i.args.startswith("VERSION=")]
    assert versions == [f"VERSION={proxy.__version__}"]
    labels = dockerfile.final.one("LABEL").args
    for key in ("title", "description", "version", "revision", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_healthcheck_is_liveness_through_the_sidecars_own_cli(dockerfile: Dockerfile) -> None:
    check = dockerfile.final.one("HEALTHCHECK").args
    command = Instruction("CMD", check.split(" CMD ", 1)[1]).exec_form()
    assert command[:2] == [SIDECAR, "wait"]
    assert command[command.index("--probe") + 1] == "live"
    assert "curl" not in check and "wget" not in check


def _excluded(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes; a dir covers its files."""
    verdict = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        if body.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, body[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, body) for prefix in prefixes)
        if hit:
            verdict = not negate
    return verdict


def test_dockerignore_admits_exactly_what_the_image_copies(dockerfile: Dockerfile) -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for stage in dockerfile.stages:
        for inst in stage.all("COPY"):
            if not inst.args.startswith("--from="):
                sources += inst.args.split()[:-1]
    assert sources, "the Dockerfile copies nothing from the build context"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _excluded(patterns, source), f"{source} is excluded by .dockerignore"
    for inside in ("proxy/cli.py", "proxy/demo/pki.py"):
        assert not _excluded(patterns, inside)
    for outside in (
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "proxy/__pycache__/x.pyc",
    ):
        assert _excluded(patterns, outside), outside


# -- the image's default configuration ----------------------------------------------------------


def _image_config_path(dockerfile: Dockerfile) -> Path:
    """The repository file the final stage copies to the path its CMD names."""
    cmd = dockerfile.final.one("CMD").exec_form()
    in_image = cmd[cmd.index("--config") + 1]
    for inst in dockerfile.final.all("COPY"):
        *sources, dest = inst.args.split()
        if dest == in_image and not sources[0].startswith("--from="):
            return ROOT / sources[0]
    raise AssertionError(f"no COPY puts a file at {in_image}")


def test_default_config_takes_the_upstream_from_pg_variables(
    dockerfile: Dockerfile, tmp_path: Path
) -> None:
    ca = tmp_path / "ca.cer"
    ca.write_bytes(b"not read at load time beyond being a readable file")
    settings = load_settings(
        config_path=str(_image_config_path(dockerfile)),
        environ={"PGHOST": "mydb.postgres.database.azure.com", "PGSSLROOTCERT": str(ca)},
    )
    (route,) = settings.routes
    assert route.listen == (TcpListen("127.0.0.1", 5432),)  # the app shares the namespace
    assert settings.admin.listen == TcpListen("0.0.0.0", 9432)  # noqa: S104 - the kubelet's probes
    assert route.upstream.host == "mydb.postgres.database.azure.com"
    assert route.upstream.sslmode == "verify-full"
    assert settings.logging.format == "json"
    exposed = [i.args for i in dockerfile.final.all("EXPOSE")]
    assert exposed == [str(settings.admin.listen.port)]


def test_default_config_without_pghost_is_refused_with_a_fix(dockerfile: Dockerfile) -> None:
    with pytest.raises(ConfigError, match="PGHOST"):
        load_settings(config_path=str(_image_config_path(dockerfile)), environ={})


def test_placeholder_ca_bundle_stops_the_sidecar_by_name() -> None:
    from proxy.tls import build_client_context

    placeholder = K8S / "examples" / "web" / "ca-bundle.pem"
    settings = load_settings(
        config_path=None, environ={"PGHOST": "db.example.com", "PGSSLROOTCERT": str(placeholder)}
    )
    with pytest.raises(ConfigError, match=re.escape("ca-bundle.pem")) as raised:
        build_client_context(settings.routes[0].upstream)
    assert "sslrootcert" in str(raised.value)


# -- the image replayed: build stage in a fresh venv, then ENTRYPOINT + CMD with PG* only -------


@dataclass
class Replayed:
    """The image's filesystem paths mapped into a temporary directory."""

    rootfs: Path
    env: dict[str, str]
    argv: list[str]

    def host(self, image_path: str) -> str:
        return str(self.rootfs / image_path.lstrip("/"))


def _copy_into(rootfs: Path, workdir: str, inst: Instruction) -> None:
    *sources, dest = inst.args.split()
    target = rootfs / (dest if dest.startswith("/") else f"{workdir}/{dest}").lstrip("/")
    for source in sources:
        origin = ROOT / source
        if origin.is_dir():
            shutil.copytree(
                origin,
                target / origin.name if dest.endswith("/") else target,
                ignore=shutil.ignore_patterns("__pycache__"),
            )
        else:
            into = target / origin.name if dest.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, into)


def _expand(value: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m[1] or m[2], ""), value)


@pytest.fixture(scope="module")
def replayed(dockerfile: Dockerfile, tmp_path_factory: pytest.TempPathFactory) -> Replayed:
    """Run the build stage's instructions, the final stage's COPYs, and compute its ENV."""
    rootfs = tmp_path_factory.mktemp("image-rootfs")
    image_paths: set[str] = set()
    workdir = "/"
    # The base image's python and pip are this interpreter's: first on PATH.
    base_path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    build_env = {"PATH": base_path, "HOME": str(rootfs / "root")}
    for inst in dockerfile.build.instructions:
        if inst.keyword == "ENV":
            for key, value in Stage("", None, [inst]).env().items():
                if value.startswith("/"):
                    image_paths.add(value)
                    value = str(rootfs / value.lstrip("/"))
                build_env[key] = value
        elif inst.keyword == "WORKDIR":
            workdir = inst.args
            (rootfs / workdir.lstrip("/")).mkdir(parents=True, exist_ok=True)
        elif inst.keyword == "COPY":
            _copy_into(rootfs, workdir, inst)
        elif inst.keyword == "RUN":
            result = subprocess.run(
                ["/bin/sh", "-ec", inst.args],
                cwd=rootfs / workdir.lstrip("/"),
                env=build_env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
            assert result.returncode == 0, f"RUN {inst.args}\n{result.stdout}\n{result.stderr}"
    for inst in dockerfile.final.all("COPY"):
        *sources, dest = inst.args.split()
        image_paths.add(dest)
        if sources[0].startswith("--from="):
            # The build stage already wrote it at the same path in rootfs.
            assert (rootfs / dest.lstrip("/")).exists(), dest
        else:
            _copy_into(rootfs, "/", inst)

    def to_host(value: str) -> str:
        for path in sorted(image_paths, key=len, reverse=True):
            value = value.replace(path, str(rootfs / path.lstrip("/")))
        return value

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for key, value in dockerfile.final.env().items():
        env[key] = to_host(_expand(value, env))
    argv = [
        to_host(arg)
        for arg in dockerfile.final.one("ENTRYPOINT").exec_form()
        + dockerfile.final.one("CMD").exec_form()
    ]
    return Replayed(rootfs, env, argv)


def _which(name: str, env: dict[str, str]) -> str:
    found = shutil.which(name, path=env["PATH"])
    assert found is not None, f"{name} not on the image's PATH {env['PATH']}"
    return found


def _json_line(line: str) -> dict[str, Any] | None:
    """A JSON log record, or None for the text lines logged before the configuration is read
    (the log format is known only once the file is)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return dict(record) if isinstance(record, dict) else None


class LogReader:
    """Reads the sidecar's stderr in a thread, so the test can wait for a line with a deadline."""

    def __init__(self, stream: Any) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._stream = stream
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put(None)

    def until(self, event: str, timeout: float = PROCESS_TIMEOUT) -> dict[str, Any]:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no {event!r} log line; got:\n{''.join(self.seen)}") from None
            if line is None:
                raise AssertionError(f"sidecar exited before {event!r}:\n{''.join(self.seen)}")
            self.seen.append(line)
            record = _json_line(line)
            if record is not None and record.get("event") == event:
                return record

    def close(self) -> None:
        """After the process has exited: the reader reaches EOF, then the pipe is closed."""
        self._thread.join(timeout=PROCESS_TIMEOUT)
        self._stream.close()

    def rest(self) -> list[str]:
        self._thread.join(timeout=PROCESS_TIMEOUT)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                return self.seen
            self.seen.append(line)


@pytest.fixture
def image_process(
    replayed: Replayed, pg: TlsOnlyCluster
) -> Iterator[tuple[subprocess.Popen[str], LogReader, int]]:
    """The image's ENTRYPOINT + CMD, configured by PG* variables alone.

    Only the two listening ports are moved (flags win over the file): this machine runs other
    tests and servers, so the image's fixed 5432 and 9432 may be taken.
    """
    env = dict(replayed.env)
    env.update(
        {"PGHOST": "localhost", "PGPORT": str(pg.port), "PGSSLROOTCERT": str(pg.ca_der_path)}
    )
    argv = [_which(replayed.argv[0], env), *replayed.argv[1:]]
    argv += ["--listen", "127.0.0.1:0", "--admin-listen", "0.0.0.0:0"]
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    logs = LogReader(process.stderr)
    try:
        admin = logs.until("admin_ready")
        yield process, logs, int(str(admin["listen"]).rsplit(":", 1)[1])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=PROCESS_TIMEOUT)
        logs.close()


def test_image_entrypoint_with_pg_variables_gets_ready_and_drains_on_sigterm(
    replayed: Replayed,
    dockerfile: Dockerfile,
    image_process: tuple[subprocess.Popen[str], LogReader, int],
    psql: Psql,
    pg: TlsOnlyCluster,
) -> None:
    process, logs, admin_port = image_process
    wait = [_which(SIDECAR, replayed.env), "wait", "--admin", f"127.0.0.1:{admin_port}"]
    ready = subprocess.run(
        [*wait, "--timeout", "30"],
        env=replayed.env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert ready.returncode == 0, ready.stderr
    # The image's HEALTHCHECK command, pointed at the moved admin port.
    check = dockerfile.final.one("HEALTHCHECK").args
    health = Instruction("CMD", check.split(" CMD ", 1)[1]).exec_form()
    healthy = subprocess.run(
        [_which(health[0], replayed.env), *health[1:], "--admin", f"127.0.0.1:{admin_port}"],
        env=replayed.env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
    )
    assert healthy.returncode == 0, healthy.stderr
    # A plaintext client through it reaches the TLS-only server.
    records = [r for r in map(_json_line, logs.seen) if r is not None]
    (route,) = [r for r in records if r.get("event") == "route_ready"]
    host, _, port = str(route["listen"]).rpartition(":")
    assert host == "127.0.0.1", route  # the image's loopback-only client listener
    assert route["sslmode"] == "verify-full" and route["sslrootcert"] == str(pg.ca_der_path)
    result = psql(
        conninfo(host=host, port=int(port), user=APP.user, dbname=APP.dbname, sslmode="disable"),
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        password=APP.password,
        env=client_env(),
    )
    assert (result.returncode, result.stdout.strip()) == (0, "t"), result.stderr

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=PROCESS_TIMEOUT) == 0
    records = [r for r in map(_json_line, logs.rest()) if r is not None]
    assert any("draining" in str(r.get("msg", "")) for r in records), logs.seen


# -- Kubernetes ------------------------------------------------------------------------------------

EXAMPLES = sorted(p.parent.name for p in (K8S / "examples").glob("*/kustomization.yaml"))
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def render(directory: Path) -> list[dict[str, Any]]:
    result = run_tool(tool("kubectl"), "kustomize", str(directory))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"])
    return dict(doc["spec"]["template"])


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in spec.get("initContainers", []) if c["name"] == SIDECAR]
    return dict(container)


@pytest.fixture(scope="module", params=EXAMPLES)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(K8S / "examples" / str(request.param))


def test_there_are_a_web_and_a_batch_example() -> None:
    kinds = {doc["kind"] for name in EXAMPLES for doc in render(K8S / "examples" / name)}
    assert {"Deployment", "Service", "Job", "CronJob", "ConfigMap"} <= kinds


def test_rendered_manifests_match_the_kubernetes_schemas(rendered: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    for doc in rendered:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {exc.path}")


def test_every_labelled_workload_gets_a_hardened_native_sidecar(
    rendered: list[dict[str, Any]], dockerfile: Dockerfile
) -> None:
    workloads = [d for d in rendered if d["kind"] in WORKLOAD_KINDS]
    assert workloads
    config_maps = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "ConfigMap"}
    uid = int(dockerfile.final.one("USER").args.split(":")[0])
    for doc in workloads:
        assert doc["metadata"]["labels"]["pg-tls-sidecar/inject"] == "true"
        template = pod_spec(doc)
        spec = template["spec"]
        sidecar = sidecar_of(spec)
        assert sidecar["restartPolicy"] == "Always"  # native: starts first, never holds a Job
        assert sidecar["image"].endswith(f":{proxy.__version__}")
        security = sidecar["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for kind in ("requests", "limits"):
            assert set(sidecar["resources"][kind]) == {"cpu", "memory"}
        # Probes on the admin endpoint, by the port's name.
        (port,) = sidecar["ports"]
        assert port["containerPort"] == 9432
        probes = {
            probe: sidecar[probe]["httpGet"]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        }
        assert {p: g["path"] for p, g in probes.items()} == {
            "startupProbe": "/startup",
            "readinessProbe": "/readyz",
            "livenessProbe": "/livez",
        }
        assert all(g["port"] == port["name"] for g in probes.values())
        # Writable /tmp (CRLs go through a temporary file) on a read-only root filesystem.
        mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]
        # The CA bundle from a ConfigMap, at the path PGSSLROOTCERT names.
        (env_from,) = sidecar["envFrom"]
        upstream = config_maps[env_from["configMapRef"]["name"]]["data"]
        root_cert = Path(upstream["PGSSLROOTCERT"])
        ca_volume = volumes[mounts[str(root_cert.parent)]]
        assert root_cert.name in config_maps[ca_volume["configMap"]["name"]]["data"]
        assert upstream["PGSSLMODE"] == "verify-full"
        assert upstream["PGHOST"].endswith(".postgres.database.azure.com")
        # Client certificates, if any, from a Secret that may be absent.
        client = volumes[mounts["/etc/pg-tls-sidecar/client"]]["secret"]
        assert client["optional"] is True
        # Scrape annotations for a Prometheus without the operator.
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(port["containerPort"])


def test_applications_talk_plaintext_to_the_loopback(rendered: list[dict[str, Any]]) -> None:
    for doc in rendered:
        if doc["kind"] not in WORKLOAD_KINDS:
            continue
        for container in pod_spec(doc)["spec"]["containers"]:
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            text = " ".join(env.values())
            assert "127.0.0.1:5432" in text or (
                env.get("PGHOST") == "127.0.0.1" and env.get("PGPORT") == "5432"
            ), container["name"]
            assert "sslmode=disable" in text or env.get("PGSSLMODE") == "disable"


def test_the_cronjob_patch_carries_the_same_pod_as_the_workload_patch() -> None:
    workload = yaml.safe_load((K8S / "base" / "sidecar.yaml").read_text())
    cronjob = yaml.safe_load((K8S / "base" / "sidecar-cronjob.yaml").read_text())
    assert workload["spec"]["template"] == cronjob["spec"]["jobTemplate"]["spec"]["template"]


def test_the_pod_monitor_selects_the_sidecars_admin_port() -> None:
    (monitor,) = render(K8S / "monitoring")
    assert monitor["kind"] == "PodMonitor"  # a CRD: not in the Kubernetes schemas
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    rules_job = re.search(r'up\{job="([^"]+)"\}', RULES.read_text())
    assert rules_job is not None
    assert {"targetLabel": "job", "replacement": rules_job[1]} in endpoint["relabelings"]
    for name in EXAMPLES:
        for doc in render(K8S / "examples" / name):
            if doc["kind"] in WORKLOAD_KINDS:
                template = pod_spec(doc)
                assert selector.items() <= template["metadata"]["labels"].items()
                ports = [p["name"] for p in sidecar_of(template["spec"])["ports"]]
                assert endpoint["port"] in ports


# -- Prometheus rules and the dashboard ------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = run_tool(tool("promtool"), "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run_tool(tool("promtool"), "test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert alerts == tested
    required = ("CertificateExpiring", "TlsVerification", "NotReady", "NearLimit", "ErrorRate")
    assert all(any(word in alert for alert in alerts) for word in required), alerts


def exported_metric_names() -> set[str]:
    """Every sample name the real exposition can contain (families exist before any sample)."""
    from proxy.metrics import Metrics

    body, _ = Metrics(proxy.__version__, ["main"]).exposition()
    names: set[str] = set()
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


METRIC = re.compile(r"\bpg_tls_sidecar_\w+")


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [
        v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"
    ]
    return queries


def test_rules_and_dashboard_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    used = set(METRIC.findall(RULES.read_text()))
    used |= {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert used, "no pg_tls_sidecar_ metric referenced"
    assert used <= exported, sorted(used - exported)
    # Every family the sidecar exports is on the dashboard (a histogram through its buckets).
    on_dashboard = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    shown = {re.sub(r"_bucket$", "", name) for name in on_dashboard}
    families = {n for n in exported if not n.endswith(("_bucket", "_sum", "_count"))}
    assert families <= shown, sorted(families - shown)


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, with Grafana's variables substituted."""
    rules = []
    for index, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            inner = query[len("label_values(") : query.rindex(",")]
            query = f"count by (x) ({inner})"
        query = query.replace("$__rate_interval", "5m")
        query = re.sub(r"\$\w+", ".*", query)
        rules.append({"record": f"dashboard:query{index}", "expr": query})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run_tool(tool("promtool"), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_importable_grafana_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None  # an import must not overwrite another dashboard
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert panel["targets"] and panel["description"]


# -- compose ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def test_compose_file_matches_the_compose_specification() -> None:
    result = run_tool(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_exist_and_prometheus_config_is_valid(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """Lay the bind mounts out as the containers see them, then let promtool read its config."""
    prometheus = compose["services"]["prometheus"]
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), source
    for volume in prometheus["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            destination = tmp_path / target.lstrip("/")
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(COMPOSE.parent / source, destination)
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config = tmp_path / config_flag.split("=", 1)[1].lstrip("/")
    result = run_tool(tool("promtool"), "check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_compose_wires_the_app_through_the_sidecar(compose: dict[str, Any]) -> None:
    services = compose["services"]
    sidecar, app = services["sidecar"], services["app"]
    assert app["network_mode"] == "service:sidecar"  # a pod's shared loopback
    assert app["environment"]["PGSSLMODE"] == "disable"
    assert app["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert sidecar["environment"]["PGSSLMODE"] == "verify-full"
    assert sidecar["environment"]["PGHOST"] == "postgres"
    assert sidecar["read_only"] is True and sidecar["cap_drop"] == ["ALL"]
    assert (
        int(sidecar["stop_grace_period"].rstrip("s"))
        > yaml.safe_load((DEPLOY / "container" / "sidecar.yaml").read_text())["timeouts"]["drain"]
    )
    assert sidecar["build"]["context"] == "../.."
    assert (COMPOSE.parent / sidecar["build"]["context"] / "Dockerfile").is_file()
    hba = (COMPOSE.parent / "pg_hba.conf").read_text()
    assert re.search(r"^hostnossl\s+all\s+all\s+all\s+reject", hba, re.M)


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, links: tuple[Any, ...]) -> None:
    """Drive both ends of a TLS handshake through memory BIOs until both are done."""
    c_in, c_out, s_in, s_out = links
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return
    raise AssertionError("handshake did not finish")


def test_compose_certificates_verify_as_the_sidecar_will(tmp_path: Path) -> None:
    """make-certs.py's files: the server chain verifies against ca.cer (DER) for "postgres"."""
    script = COMPOSE.parent / "make-certs.py"
    out = tmp_path / "certs"
    out.mkdir()
    first = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert first.returncode == 0, first.stderr
    key = (out / "server.key").stat()
    assert key.st_mode & 0o777 == 0o640
    if os.geteuid() == 0:
        assert (key.st_uid, key.st_gid) == (0, 999)  # root-owned, group postgres
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / "server.crt", out / "server.key")
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cadata=(out / "ca.cer").read_bytes())
    links = (ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO())
    client = client_ctx.wrap_bio(links[0], links[1], server_hostname="postgres")
    server = server_ctx.wrap_bio(links[2], links[3], server_side=True)
    _handshake(client, server, links)
    assert client.version() in ("TLSv1.2", "TLSv1.3")
    # A second run keeps the server's identity.
    before = (out / "server.crt").read_bytes()
    again = subprocess.run(
        [sys.executable, str(script), str(out)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert again.returncode == 0 and "kept" in again.stdout
    assert (out / "server.crt").read_bytes() == before
