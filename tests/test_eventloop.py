"""The event loop: ``choose_loop``, the ``event_loop`` setting, and the real CLI on both loops.

"uvloop is not installed" is produced with the import system's own switch rather than a second
virtualenv: ``sys.modules["uvloop"] = None`` makes ``import uvloop`` raise ModuleNotFoundError,
exactly what an environment without the package does (``importlib.import_module`` and
``find_spec`` both honour it). For the command line it is set in a real subprocess, before the
sidecar is imported, so nothing in the test process is patched.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import uvloop

from proxy.config import load_settings
from proxy.errors import ConfigError
from proxy.eventloop import EVENT_LOOP_ENV, UVLOOP_INSTALL, choose_loop
from tests.conftest import RunningSidecar, StartSidecar

UPSTREAM = "host=db.example.com"
CLI_TIMEOUT = 30
PROXY = [sys.executable, "-m", "proxy"]
RUN_ARGS = ("--listen", "127.0.0.1:0", "--admin-listen", "off")

# Runs the CLI with uvloop made unimportable, as in an environment that never installed it.
WITHOUT_UVLOOP = (
    "import sys; sys.modules['uvloop'] = None; from proxy.cli import main; raise SystemExit(main())"
)


@pytest.fixture
def no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, ``import uvloop`` fails as if it were not installed (undone after)."""
    monkeypatch.setitem(sys.modules, "uvloop", None)


def _loop_module(factory: object) -> str:
    """Create a loop the way ``asyncio.Runner`` does and name the package its class is from."""

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__.split(".")[0]

    with asyncio.Runner(loop_factory=factory) as runner:  # type: ignore[arg-type]
        return runner.run(which())


# --- choose_loop


@pytest.mark.parametrize(
    ("setting", "name_prefix", "package"),
    [
        ("auto", "uvloop ", "uvloop"),
        ("uvloop", "uvloop ", "uvloop"),
        ("asyncio", "asyncio", "asyncio"),
    ],
)
def test_choose_loop_with_uvloop_installed(setting: str, name_prefix: str, package: str) -> None:
    name, factory = choose_loop(setting)
    assert name.startswith(name_prefix)
    if package == "uvloop":
        assert name == f"uvloop {uvloop.__version__}"
    else:
        assert factory is None  # asyncio.Runner's default: the stdlib loop
    assert _loop_module(factory) == package


@pytest.mark.usefixtures("no_uvloop")
def test_auto_without_uvloop_is_the_stdlib_loop() -> None:
    name, factory = choose_loop("auto")
    assert (name, factory) == ("asyncio", None)
    assert _loop_module(factory) == "asyncio"


@pytest.mark.usefixtures("no_uvloop")
@pytest.mark.parametrize("key", ["event_loop", "--event-loop", EVENT_LOOP_ENV])
def test_uvloop_without_uvloop_names_the_setting_and_the_pip_command(key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        choose_loop("uvloop", key=key)
    assert caught.value.key == key
    assert "not installed" in caught.value.problem
    assert caught.value.fix is not None and UVLOOP_INSTALL in caught.value.fix
    assert "pip install 'pg-tls-sidecar[uvloop]'" in str(caught.value)


@pytest.mark.parametrize("setting", ["", "trio", "UVLOOP", "uvloop ", "default"])
def test_choose_loop_refuses_anything_else(setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        choose_loop(setting)
    assert caught.value.key == "event_loop"
    assert caught.value.value == setting
    assert "auto, asyncio, uvloop" in str(caught.value)


# --- the event_loop setting: flag, file, environment


def _config(tmp_path: Path, event_loop: object) -> str:
    path = tmp_path / "sidecar.yaml"
    path.write_text(json.dumps({"event_loop": event_loop}))  # JSON is YAML
    return str(path)


@pytest.mark.parametrize(
    ("flag", "in_file", "env", "expected"),
    [
        pytest.param(None, None, None, "auto", id="default-auto"),
        pytest.param(None, None, "asyncio", "asyncio", id="environment"),
        pytest.param(None, "uvloop", None, "uvloop", id="file"),
        pytest.param("asyncio", None, None, "asyncio", id="flag"),
        pytest.param(None, "asyncio", "uvloop", "asyncio", id="file-beats-environment"),
        pytest.param("uvloop", "asyncio", "asyncio", "uvloop", id="flag-beats-file"),
        pytest.param(None, None, " UVLOOP ", "uvloop", id="any-case-and-spaces"),
        pytest.param(None, "Auto", None, "auto", id="file-any-case"),
    ],
)
def test_event_loop_setting_sources(
    tmp_path: Path, flag: str | None, in_file: str | None, env: str | None, expected: str
) -> None:
    settings = load_settings(
        config_path=_config(tmp_path, in_file) if in_file is not None else None,
        upstream=UPSTREAM,
        event_loop=flag,
        environ={EVENT_LOOP_ENV: env} if env is not None else {},
    )
    assert settings.event_loop == expected


@pytest.mark.parametrize(
    ("source", "value", "key"),
    [
        ("flag", "fast", "--event-loop"),
        ("env", "libuv", EVENT_LOOP_ENV),
        ("file", "uv-loop", "event_loop"),
        ("file", 1, "event_loop"),
        ("file", ["uvloop"], "event_loop"),
    ],
)
def test_event_loop_setting_invalid_values(
    tmp_path: Path, source: str, value: object, key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            config_path=_config(tmp_path, value) if source == "file" else None,
            upstream=UPSTREAM,
            event_loop=value if source == "flag" else None,  # type: ignore[arg-type]
            environ={EVENT_LOOP_ENV: value} if source == "env" else {},  # type: ignore[dict-item]
        )
    assert caught.value.key == key
    if source == "file":
        assert caught.value.source == str(tmp_path / "sidecar.yaml")


@pytest.mark.usefixtures("no_uvloop")
def test_missing_uvloop_is_blamed_on_the_source_that_asked_for_it(tmp_path: Path) -> None:
    path = _config(tmp_path, "uvloop")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=path, upstream=UPSTREAM, environ={})
    assert (caught.value.key, caught.value.source) == ("event_loop", path)
    assert UVLOOP_INSTALL in str(caught.value)

    # The environment asks for uvloop, but the flag wins: nothing is missing.
    settings = load_settings(
        config_path=None,
        upstream=UPSTREAM,
        event_loop="asyncio",
        environ={EVENT_LOOP_ENV: "uvloop"},
    )
    assert settings.event_loop == "asyncio"


def test_unknown_top_level_key_still_suggests_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("event_lop: uvloop\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(config_path=str(path), upstream=UPSTREAM, environ={})
    assert "did you mean event_loop?" in str(caught.value)


# --- the sidecars the test suite starts


def test_the_sidecar_under_test_runs_on_the_loop_pytest_was_asked_for(
    start_sidecar: StartSidecar, request: pytest.FixtureRequest
) -> None:
    """``pytest --event-loop uvloop`` must really move the sidecars, or the second run is moot."""
    running = start_sidecar(UPSTREAM)
    package = running.run_in_loop(lambda: type(asyncio.get_running_loop()).__module__)
    assert package.split(".")[0] == request.config.getoption("--event-loop")
    assert RunningSidecar.event_loop == request.config.getoption("--event-loop")


# --- the real command line


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(extra)
    return env


@contextmanager
def _sidecar_process(
    python: list[str], args: list[str], env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[str], dict[str, object], int]]:
    """Start ``run`` and read its JSON log up to readiness: the event loop line and the port."""
    proc = subprocess.Popen(
        [*python, "run", *RUN_ARGS, "--log-format", "json", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        loop_line: dict[str, object] | None = None
        for line in proc.stderr:
            doc = json.loads(line)
            if doc.get("event") == "event_loop":
                loop_line = doc
            if doc.get("event") == "route_ready":
                assert loop_line is not None, "no event loop line before the sidecar listened"
                yield proc, loop_line, int(doc["listen"].rsplit(":", 1)[1])
                break
        else:
            raise AssertionError("the sidecar exited before listening")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(CLI_TIMEOUT)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("args", "env", "without_uvloop", "loop_prefix", "class_prefix"),
    [
        pytest.param(["--event-loop", "uvloop"], {}, False, "uvloop ", "uvloop.", id="flag-uvloop"),
        pytest.param([], {}, False, "uvloop ", "uvloop.", id="auto-installed"),
        pytest.param(["--event-loop", "asyncio"], {}, False, "asyncio", "asyncio.", id="asyncio"),
        pytest.param([], {EVENT_LOOP_ENV: "asyncio"}, False, "asyncio", "asyncio.", id="env"),
        pytest.param([], {}, True, "asyncio", "asyncio.", id="auto-not-installed"),
    ],
)
def test_cli_runs_and_relays_on_the_chosen_loop(
    pg_upstream: str,
    args: list[str],
    env: dict[str, str],
    without_uvloop: bool,
    loop_prefix: str,
    class_prefix: str,
) -> None:
    python = [sys.executable, "-c", WITHOUT_UVLOOP] if without_uvloop else [*PROXY]
    with _sidecar_process(python, [*args, "--upstream", pg_upstream], _env(**env)) as (
        proc,
        line,
        port,
    ):
        assert str(line["loop"]).startswith(loop_prefix)
        assert str(line["loop_class"]).startswith(class_prefix)  # the loop really running
        info = f"host=127.0.0.1 port={port} user=app password=app-secret-pw dbname=app"
        with psycopg.connect(info + " sslmode=disable connect_timeout=10") as conn:
            row = conn.execute("select ssl from pg_stat_ssl where pid = pg_backend_pid()")
            assert row.fetchone() == (True,)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(CLI_TIMEOUT) == 0


def test_cli_uvloop_without_uvloop_exits_2_with_the_pip_command(pg_upstream: str) -> None:
    flags = ("--event-loop", "uvloop", "--upstream", pg_upstream)
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT_UVLOOP, "run", *RUN_ARGS, *flags],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=CLI_TIMEOUT,
    )
    assert res.returncode == 2, res.stderr
    assert "--event-loop" in res.stderr
    assert UVLOOP_INSTALL in res.stderr
    assert "route_ready" not in res.stderr and "listening" not in res.stderr
