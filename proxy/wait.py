"""``pg-tls-sidecar wait``: block until the local sidecar reports ready.

For containers that must not start before the proxy (an app's entrypoint, a Job's first step)
and for the image's HEALTHCHECK, which has no curl. It asks the admin endpoint's ``/readyz``
with the standard library's HTTP client; ``--probe live`` asks ``/livez`` instead.
"""

from __future__ import annotations

import http.client
import sys
import time
from typing import TextIO

POLL_INTERVAL = 0.5


def _ask(host: str, port: int, path: str, timeout: float) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(4096).decode("utf-8", "replace").strip()
    finally:
        conn.close()


def wait_ready(
    host: str,
    port: int,
    *,
    timeout: float,
    path: str = "/readyz",
    out: TextIO = sys.stderr,
) -> int:
    """Exit code 0 once ``path`` answers 200; 1 with the last reason when ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while True:
        remaining = deadline - time.monotonic()
        try:
            status, body = _ask(host, port, path, max(0.1, min(remaining, 5.0)))
        except OSError as exc:
            last = f"cannot reach the admin endpoint at {host}:{port}: {exc.strerror or exc}"
        else:
            if status == 200:
                return 0
            last = f"{path} answered {status}: {body}"
        if time.monotonic() + POLL_INTERVAL > deadline:
            print(f"pg-tls-sidecar wait: not ready after {timeout:g} s: {last}", file=out)
            return 1
        time.sleep(POLL_INTERVAL)  # pacing a poll of another process, not synchronisation
