"""The benchmark harness still runs end to end (its figures are not judged here).

``tests/benchmark.py`` is run rarely and by hand, so without this test it would rot silently
whenever the sidecar's command line or configuration changes. ``--quick`` with direct TLS and
the sidecar takes about 20 s; timing is never asserted, only that every workload produced a
figure and a ratio to direct TLS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.benchmark import WORKLOADS

REPO = Path(__file__).resolve().parents[1]


def _checkout_copy(tmp_path: Path) -> Path:
    """Another checkout of the sidecar, as ``git worktree add`` would make for a comparison."""
    copy = tmp_path / "other-checkout"
    shutil.copytree(REPO / "proxy", copy / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _benchmark(*args: str, timeout: float = 110) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.benchmark", "--quick", "--no-install", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_quick_benchmark_reports_a_ratio_for_every_workload(tmp_path: Path) -> None:
    raw = tmp_path / "figures.json"
    other = _checkout_copy(tmp_path)
    out = _benchmark(
        "--targets", "direct,sidecar", "--compare-checkout", str(other), "--json", str(raw)
    )
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(raw.read_text())
    assert set(figures["targets"]) == {"direct", "sidecar", "sidecar-compare"}
    for workload in WORKLOADS:
        direct = figures["targets"]["direct"]["workloads"][workload]
        assert direct["ratio"] == 1.0, workload
        for name in ("direct", "sidecar", "sidecar-compare"):
            # The whole machine's CPU and context switches per unit: every run has some.
            cpu, switches = figures["targets"][name]["workloads"][workload][
                "machine_cpu_and_switches_per_unit"
            ]
            assert switches > 0, (name, workload, switches)
            # The machine's CPU includes the proxy's own, and a transaction costs microseconds.
            proxy = figures["targets"][name]["workloads"][workload]["proxy_cpu_per_unit"]
            assert cpu >= (proxy or 0) and cpu > (0.01 if workload.startswith("copy") else 1)
        for name in ("sidecar", "sidecar-compare"):
            sidecar = figures["targets"][name]["workloads"][workload]
            assert sidecar["failure"] is None, (name, workload, sidecar["failure"])
            assert sidecar["ratio"] is not None and sidecar["ratio"] > 0, (name, workload)
            assert sidecar["proxy_cpu_per_unit"] is not None, (name, workload)
    # The Markdown table is printed with the sidecars' rows and ratios.
    assert "| pg-tls-sidecar, protocol metrics on, asyncio event loop |" in out.stdout
    assert f"| pg-tls-sidecar from {other} (not a git checkout), protocol metrics on" in out.stdout
    assert "Whole machine (client, server, proxy and kernel" in out.stdout


def test_the_compared_checkout_is_the_code_that_runs(tmp_path: Path) -> None:
    """A copy that cannot start must fail the run with its own words: it is what was started."""
    other = _checkout_copy(tmp_path)
    (other / "proxy" / "__main__.py").write_text(
        'import sys\nsys.exit("this is the compared checkout")\n'
    )
    out = _benchmark("--targets", "direct", "--compare-checkout", str(other), timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "this is the compared checkout" in out.stdout + out.stderr
