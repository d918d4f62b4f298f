"""A stuck stage is visible: readiness, metrics; and the small start-up/probe surprises.

Readiness (the service's own health name) turns NOT_SERVING while its worker holds an event
that does not progress for ``stall_seconds``; liveness ("") stays SERVING, so Kubernetes
stops routing to it without killing it. ``histoloop health`` without ``--address`` probes
the server this machine's settings start, and a restart on the metrics port of a stopped
server (connections in TIME_WAIT) binds; a port really held by someone else is a clear
error naming HISTOLOOP_METRICS_PORT.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from histoloop import events
from histoloop.cli import main
from histoloop.config import load_settings
from histoloop.errors import ConfigError
from histoloop.server import Server
from histoloop.v1 import events_pb2

STORE = "histoloop.v1.AnnotationStoreService"


def _status(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
            .status
        )


def _wait(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_stage_stuck_on_an_event_is_not_ready_but_alive(tmp_path: Path) -> None:
    server = Server(
        load_settings(data_dir=tmp_path, grpc_port=0, metrics_port=0, stall_seconds=1.0),
        ["annotation_store"],
    )
    server.start()
    release = threading.Event()
    try:
        # the store's dependency hangs (as a stuck storage mount would): the handler never returns
        worker = server.workers[0]
        worker._handlers[events.QUERYSET_READY] = lambda message, record: release.wait(30)
        serving = health_pb2.HealthCheckResponse.SERVING
        _wait(lambda: _status(server.port, STORE) == serving)
        events.publish(
            server.runtime.bus,
            events_pb2.QuerySetReady(
                meta=events.new_meta(project="p", producer="test"), queryset_id="q1"
            ),
        )
        _wait(lambda: _status(server.port, STORE) == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _status(server.port, "") == serving  # liveness unchanged
        _wait(
            lambda: (
                (
                    REGISTRY.get_sample_value(
                        "histoloop_oldest_unhandled_event_age_seconds", {"stage": "recording"}
                    )
                    or 0
                )
                > 0
            )
        )
        release.set()
        _wait(lambda: _status(server.port, STORE) == serving)
    finally:
        release.set()
        server.stop(1)


def test_health_without_address_probes_the_configured_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    server = Server(load_settings(data_dir=tmp_path, grpc_port=0, metrics_port=0), ["acquisition"])
    server.start()
    try:
        monkeypatch.setenv("HISTOLOOP_GRPC_PORT", str(server.port))
        assert main(["health"]) == 0
        assert f"127.0.0.1:{server.port}" in capsys.readouterr().out
    finally:
        server.stop(1)


def test_metrics_port_restart_binds_and_a_held_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = Server(
        load_settings(data_dir=tmp_path / "a", grpc_port=0, metrics_port=port), ["acquisition"]
    )
    first.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert b"histoloop_" in reply.read()
    first.stop(1)  # the scrape's connection is left in TIME_WAIT on the server side
    again = Server(
        load_settings(data_dir=tmp_path / "b", grpc_port=0, metrics_port=port), ["acquisition"]
    )
    again.start()
    try:
        assert again.metrics_port == port
        third = Server(
            load_settings(data_dir=tmp_path / "c", grpc_port=0, metrics_port=port), ["acquisition"]
        )
        with pytest.raises(
            ConfigError, match=f"HISTOLOOP_METRICS_PORT: cannot listen on 127.0.0.1:{port}"
        ):
            third.start()
        third.stop(0)
    finally:
        again.stop(1)
