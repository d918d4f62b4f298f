"""TLS and mutual TLS on the gRPC port, with certificates generated here (in-process server).

The distributed stack of this folder runs with mutual TLS too (``test_security.py`` probes it
from outside); these tests cover the settings themselves, fast, on one embedded ``Server``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histoloop.channels import make_channel
from histoloop.config import Settings
from histoloop.errors import ConfigError
from histoloop.server import Server
from histoloop.v1 import acquisition_pb2, acquisition_pb2_grpc
from tests.e2e.stack import TlsFiles, make_tls

TOKEN = "svc-tls-test-token-0123456789"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("tls"))


def _server(tmp: Path, **tls_settings: object) -> Server:
    settings = Settings(
        data_dir=tmp, grpc_port=0, metrics_port=0, auth="token", service_token=TOKEN, **tls_settings
    )  # type: ignore[arg-type]
    server = Server(settings, ["acquisition"])
    server.start()
    return server


@pytest.fixture
def tls_server(tmp_path: Path, tls: TlsFiles) -> Iterator[Server]:
    server = _server(tmp_path, tls_cert=tls.cert, tls_key=tls.key)
    yield server
    server.stop(1)


@pytest.fixture
def mtls_server(tmp_path: Path, tls: TlsFiles) -> Iterator[Server]:
    server = _server(tmp_path, tls_cert=tls.cert, tls_key=tls.key, tls_client_ca=tls.ca)
    yield server
    server.stop(1)


def _strategies(channel: grpc.Channel, **kwargs: object) -> int:
    reply = acquisition_pb2_grpc.AcquisitionServiceStub(channel).ListStrategies(
        acquisition_pb2.ListStrategiesRequest(), timeout=10, **kwargs
    )
    return len(reply.strategies)


def _health_code(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_server_tls(tls_server: Server, tls: TlsFiles) -> None:
    address = f"127.0.0.1:{tls_server.port}"
    with make_channel(address, Settings(tls_ca=tls.ca, service_token=TOKEN)) as channel:
        assert _strategies(channel) > 0  # verified the server, sent the token as call credentials
    with (
        make_channel(address, Settings(tls_ca=tls.ca), token="wrong") as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        _strategies(channel)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # TLS does not replace the token


def test_plaintext_client_is_refused(tls_server: Server) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        assert _health_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_ca_is_refused(tls_server: Server, tls: TlsFiles) -> None:
    # the client checks the server against the system roots, which do not hold the test CA
    with grpc.secure_channel(
        f"127.0.0.1:{tls_server.port}", grpc.ssl_channel_credentials()
    ) as channel:
        assert _health_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(mtls_server: Server, tls: TlsFiles) -> None:
    address = f"127.0.0.1:{mtls_server.port}"
    with make_channel(
        address, Settings(tls_ca=tls.ca, tls_cert=tls.cert, tls_key=tls.key, service_token=TOKEN)
    ) as channel:
        assert _strategies(channel) > 0
        assert _health_code(channel) == grpc.StatusCode.OK


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_server: Server, tls: TlsFiles
) -> None:
    address = f"127.0.0.1:{mtls_server.port}"
    with make_channel(address, Settings(tls_ca=tls.ca, service_token=TOKEN)) as channel:
        assert _health_code(channel) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            _strategies(channel)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mtls_server: Server, tls: TlsFiles
) -> None:
    rogue = Settings(
        tls_ca=tls.ca, tls_cert=tls.rogue_cert, tls_key=tls.rogue_key, service_token=TOKEN
    )
    with make_channel(f"127.0.0.1:{mtls_server.port}", rogue) as channel:
        assert _health_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_plaintext_channel_sends_the_token(tmp_path: Path) -> None:
    server = _server(tmp_path)
    try:
        address = f"127.0.0.1:{server.port}"
        with make_channel(address, Settings(service_token=TOKEN)) as channel:
            assert _strategies(channel) > 0
            # a call that brings its own token keeps it
            with pytest.raises(grpc.RpcError) as err:
                _strategies(channel, metadata=[("authorization", "Bearer not-the-token")])
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with (
            make_channel(address, Settings(service_token=TOKEN), token="") as channel,
            pytest.raises(grpc.RpcError) as err,
        ):
            _strategies(channel)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(1)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"tls_cert": "CERT"}, "both HISTOLOOP_TLS_CERT and HISTOLOOP_TLS_KEY"),
        ({"tls_key": "KEY"}, "both HISTOLOOP_TLS_CERT and HISTOLOOP_TLS_KEY"),
        ({"tls_client_ca": "CA"}, "HISTOLOOP_TLS_CLIENT_CA"),
        ({"tls_cert": "CERT", "tls_key": "MISSING"}, "HISTOLOOP_TLS_KEY: cannot read"),
        ({"tls_cert": "KEY", "tls_key": "KEY", "tls_client_ca": "NOT_PEM"}, "not a PEM file"),
    ],
    ids=["cert-only", "key-only", "client-ca-only", "missing-file", "not-pem"],
)
def test_bad_tls_settings_fail_at_start(
    tmp_path: Path, tls: TlsFiles, settings: dict[str, str], message: str
) -> None:
    files = {
        "CERT": tls.cert,
        "KEY": tls.key,
        "CA": tls.ca,
        "MISSING": tmp_path / "missing.pem",
        "NOT_PEM": tmp_path / "not.pem",
    }
    (tmp_path / "not.pem").write_text("hello")
    with pytest.raises(ConfigError, match=message):
        Server(
            Settings(
                data_dir=tmp_path,
                grpc_port=0,
                metrics_port=0,
                **{k: files[v] for k, v in settings.items()},
            ),
            ["acquisition"],
        )
