"""The scaffold: health, reflection, metrics, error mapping and auth on a real gRPC server."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from histoloop.config import load_settings
from histoloop.server import Server
from histoloop.v1 import training_pb2, training_pb2_grpc

ALL_SERVICES = {
    "histoloop.v1.AnnotationStoreService",
    "histoloop.v1.TilingService",
    "histoloop.v1.EmbeddingService",
    "histoloop.v1.TrainingService",
    "histoloop.v1.PredictionService",
    "histoloop.v1.AcquisitionService",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("serve")
    srv = Server(load_settings(data_dir=data, grpc_port=0, metrics_port=0))
    srv.start()
    yield srv
    srv.stop(2)


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


def test_health_serving_for_every_service(channel: grpc.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for name in ["", *ALL_SERVICES]:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_all_six_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for s in next(replies).list_services_response.service}
    assert ALL_SERVICES <= names
    assert "grpc.health.v1.Health" in names


def test_metrics_endpoint_serves_prometheus_text(server: Server, channel: grpc.Channel) -> None:
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(training_pb2.GetModelRequest(project_id="no-such-project"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-project" in err.value.details()
    body = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert "# TYPE histoloop_rpc_requests_total counter" in body
    assert (
        'histoloop_rpc_requests_total{code="NOT_FOUND",method="GetModel",service="TrainingService"}'
        in body
    )
    assert "histoloop_rpc_latency_seconds_bucket" in body


def test_stop_twice_is_safe(tmp_path: Path) -> None:
    srv = Server(load_settings(data_dir=tmp_path, grpc_port=0, metrics_port=0), ["training"])
    srv.start()
    srv.stop(1)
    srv.stop(1)


def test_tokens_required_when_auth_is_on(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        grpc_port=0,
        metrics_port=0,
        auth="token",
        service_token="svc-token-for-tests",
    )
    srv = Server(settings, ["training"])
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = training_pb2_grpc.TrainingServiceStub(ch)
            request = training_pb2.GetModelRequest(project_id="p")
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModel(request, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModel(request, timeout=5, metadata=[("authorization", "Bearer wrong")])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:
                stub.GetModel(
                    request, timeout=5, metadata=[("authorization", "Bearer svc-token-for-tests")]
                )
            assert err.value.code() == grpc.StatusCode.NOT_FOUND  # past auth, into the service
            health = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no token
    finally:
        srv.stop(1)


def test_settle_heap_takes_the_start_up_objects_out_of_full_collections() -> None:
    import gc

    from histoloop.runtime import settle_heap

    alive = len(gc.get_objects())
    try:
        settle_heap()
        # what start-up left (modules, functions, classes) is frozen: no longer scanned
        assert gc.get_freeze_count() >= alive // 2 > 10_000
        assert len(gc.get_objects()) < alive // 10
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
