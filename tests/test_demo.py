"""The README's first command: the demo really shows a plaintext client getting TLS upstream."""

from __future__ import annotations

import os
import subprocess
import sys


def test_demo_once_connects_a_plaintext_client_through_verified_tls() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    res = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--once"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "ca.cer" in out and "no OpenSSL conversion" in out
    assert "refused" in out  # plaintext straight to the server is rejected
    assert "the server saw ssl=t" in out
    assert "Demo complete." in out
