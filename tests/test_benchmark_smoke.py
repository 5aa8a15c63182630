"""The benchmark harness still runs end to end (its figures are not judged here).

``tests/benchmark.py`` is run rarely and by hand, so without this test it would rot silently
whenever the sidecar's command line or configuration changes. ``--quick`` with direct TLS and
the sidecar takes about 20 s; timing is never asserted, only that every workload produced a
figure and a ratio to direct TLS.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.benchmark import WORKLOADS

REPO = Path(__file__).resolve().parents[1]


def test_quick_benchmark_reports_a_ratio_for_every_workload(tmp_path: Path) -> None:
    raw = tmp_path / "figures.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.benchmark",
            "--quick",
            "--targets",
            "direct,sidecar",
            "--no-install",
            "--json",
            str(raw),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    figures = json.loads(raw.read_text())
    assert set(figures["targets"]) == {"direct", "sidecar"}
    for workload in WORKLOADS:
        direct = figures["targets"]["direct"]["workloads"][workload]
        sidecar = figures["targets"]["sidecar"]["workloads"][workload]
        assert direct["ratio"] == 1.0, workload
        assert sidecar["failure"] is None, (workload, sidecar["failure"])
        assert sidecar["ratio"] is not None and sidecar["ratio"] > 0, (workload, sidecar)
        assert sidecar["proxy_cpu_per_unit"] is not None, workload
    # The Markdown table is printed with the sidecar's row and ratios.
    assert "| pg-tls-sidecar, protocol metrics on, asyncio event loop |" in out.stdout
