"""A real ``histoloop serve`` process on free ports, and a runner for the client commands."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

Cli = Callable[..., subprocess.CompletedProcess]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``histoloop serve`` (all six services, embedded backends) → (address, data folder)."""
    data = tmp_path_factory.mktemp("serve")
    port = _free_port()
    env = {
        **os.environ,
        "HISTOLOOP_DATA_DIR": str(data),
        "HISTOLOOP_GRPC_PORT": str(port),
        "HISTOLOOP_METRICS_PORT": "0",
    }
    log = data / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "histoloop.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "ab"),
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    yield address, data
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def cli(served: tuple[str, Path]) -> Cli:
    """Run ``histoloop …`` as a subprocess against the served port (the default server)."""
    address, _data = served

    def run(*args: str, rc: int = 0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        env = {
            **os.environ,
            "HISTOLOOP_GRPC_PORT": address.rsplit(":", 1)[1],
            "HISTOLOOP_METRICS_PORT": "0",
        }
        env.pop("HISTOLOOP_TOKEN", None)
        done = subprocess.run(
            [sys.executable, "-m", "histoloop.cli", *args],
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == rc, (
            f"histoloop {' '.join(args)} → {done.returncode}\n{done.stdout}\n{done.stderr}"
        )
        return done

    return run


@pytest.fixture(scope="module")
def cli_inproc(served: tuple[str, Path]) -> Cli:
    """The same commands through ``histoloop.cli.main`` in this process (no interpreter start-up
    per call: for the many bad-input cases), against the same served port."""
    from histoloop.cli import main

    address, _data = served

    def run(*args: str, rc: int = 0, cwd: Path | None = None) -> subprocess.CompletedProcess:
        out, err = io.StringIO(), io.StringIO()
        saved = os.environ.get("HISTOLOOP_GRPC_PORT"), Path.cwd()
        os.environ["HISTOLOOP_GRPC_PORT"] = address.rsplit(":", 1)[1]
        try:
            if cwd is not None:
                os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = main(list(args))
                except SystemExit as exc:  # argparse usage errors
                    code = int(exc.code or 0)
        finally:
            os.chdir(saved[1])
            if saved[0] is None:
                os.environ.pop("HISTOLOOP_GRPC_PORT", None)
            else:
                os.environ["HISTOLOOP_GRPC_PORT"] = saved[0]
        done = subprocess.CompletedProcess(
            ["histoloop", *args], code, out.getvalue(), err.getvalue()
        )
        assert code == rc, f"histoloop {' '.join(args)} → {code}\n{done.stdout}\n{done.stderr}"
        return done

    return run


def as_json(done: subprocess.CompletedProcess) -> object:
    """The ``--json`` output of a command."""
    return json.loads(done.stdout)
