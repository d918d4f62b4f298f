"""``histoloop serve`` serves the workspace beside the services and prints its URL; SIGTERM stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx


def test_serve_prints_the_workspace_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    env = {**os.environ, "HISTOLOOP_METRICS_PORT": "0", "HISTOLOOP_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "histoloop.cli",
            "serve",
            "--port",
            "0",
            "--web-port",
            "0",
            "--data-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = ""
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            if line.startswith("browser workspace: "):
                url = line.split(": ", 1)[1].strip()
        assert url.startswith("http://127.0.0.1:"), "no workspace URL printed"
        assert httpx.get(url + "healthz", timeout=10).json() == {"status": "ok"}
        ready = httpx.get(url + "readyz", timeout=10)
        assert ready.status_code in (200, 503)  # the store may still be starting its checks
        me = httpx.get(url + "api/me", timeout=10).json()
        assert me == {"auth": False, "signed_in": True, "subject": "local", "read_only": False}
        reply = httpx.get(
            url + "api/projects/nope/status", timeout=10
        )  # the local admin: a plain 404
        assert reply.status_code == 404 and "nope" in reply.json()["error"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
