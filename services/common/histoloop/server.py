"""The gRPC server scaffold every service runs in.

One server hosts one or more services (all six for ``histoloop serve``, one for
``histoloop run``), with the standard health service (NOT_SERVING until each service's
dependency checks pass), server reflection, the interceptor (identity, error mapping,
metrics), a Prometheus ``/metrics`` endpoint, the services' event workers and background
loops, and graceful shutdown with a grace period on SIGTERM/SIGINT. The gRPC port is
plaintext unless ``tls_cert``/``tls_key`` are set (TLS), with ``tls_client_ca`` requiring
client certificates (mutual TLS); clients connect with :func:`histoloop.channels.make_channel`.
"""

from __future__ import annotations

import importlib
import logging
import signal
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from histoloop.artifacts import make_store
from histoloop.auth import settings_resolver
from histoloop.bus import make_bus
from histoloop.config import Settings
from histoloop.errors import ConfigError, HistoloopError, InvalidArgument
from histoloop.interceptors import ServerInterceptor
from histoloop.runtime import (
    EDGE_SERVICE_NAMES,
    SERVICE_NAMES,
    Background,
    Runtime,
    ServiceParts,
    settle_heap,
)
from histoloop.worker import EventWorker

__all__ = ["MAX_MESSAGE_BYTES", "Server", "normalise_service_name", "server_credentials"]

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_CHECK_INTERVAL = 2.0


def normalise_service_name(name: str) -> str:
    """``annotation-store`` → ``annotation_store``; unknown names raise InvalidArgument."""
    normal = name.strip().lower().replace("-", "_")
    if normal not in SERVICE_NAMES + EDGE_SERVICE_NAMES:
        raise InvalidArgument(
            f"unknown service {name!r}; choose one of {', '.join(SERVICE_NAMES + EDGE_SERVICE_NAMES)}"
        )
    return normal


class Server:
    """Runs ``services`` (short names) with the backends ``settings`` choose."""

    def __init__(self, settings: Settings, services: Sequence[str] = SERVICE_NAMES) -> None:
        self.settings = settings
        self.names = [normalise_service_name(s) for s in services]
        settings.validate_for_start(self.names[0] if len(self.names) == 1 else None)
        self._credentials = server_credentials(settings)
        client_id = "histoloop-" + ("all" if len(self.names) > 1 else self.names[0])
        self.runtime = Runtime(
            settings=settings,
            bus=make_bus(settings, client_id=client_id),
            store=make_store(settings),
        )
        self.interceptor = ServerInterceptor(
            auth_required=settings.auth_mode == "token",
            resolvers=[
                settings_resolver(
                    settings.service_token.get_secret_value() if settings.service_token else None,
                    settings.admin_token.get_secret_value() if settings.admin_token else None,
                )
            ],
        )
        self.parts: list[ServiceParts] = []
        self.workers: list[EventWorker] = []
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=32, thread_name_prefix="rpc"),
            interceptors=[self.interceptor],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: WSGIServer | None = None
        self._checker: threading.Thread | None = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.companions: list[Background] = []
        """Started after the gRPC port is bound, stopped first (the browser workspace)."""

    # start ---------------------------------------------------------------------------
    def start(self) -> None:
        """Build the services, bind the ports, start workers; returns at once."""
        for name in self.names:
            module = importlib.import_module(f"histoloop.{name}.service")
            parts: ServiceParts = module.build(self.runtime)
            parts.register(self._grpc)
            resolver = getattr(parts, "token_resolver", None)
            if resolver is not None:
                self.interceptor.add_resolver(resolver)
            self.parts.append(parts)
            self.health.set(parts.grpc_service, health_pb2.HealthCheckResponse.NOT_SERVING)
        # "" is liveness: the process is up. Each service's own name is readiness: its
        # dependencies answer (NOT_SERVING until they do).
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            [p.grpc_service for p in self.parts]
            + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._grpc,
        )
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        if self._credentials is None:
            self.port = self._grpc.add_insecure_port(address)
        else:
            self.port = self._grpc.add_secure_port(address, self._credentials)
        if self.port == 0:
            raise HistoloopError(f"cannot bind gRPC port {address}")
        try:
            # SO_REUSEADDR (prometheus_client's server sets it): a connection left in
            # TIME_WAIT by the previous run does not block a restart on the same port
            self._metrics_server, _ = start_http_server(
                self.settings.metrics_port, addr=self.settings.grpc_host
            )
        except OSError as exc:
            self._grpc.stop(0)
            raise ConfigError(
                f"HISTOLOOP_METRICS_PORT: cannot listen on {self.settings.grpc_host}:"
                f"{self.settings.metrics_port} ({exc.strerror}); another process holds it — "
                "stop it or choose another port (0 picks a free one)"
            ) from None
        self.metrics_port = self._metrics_server.server_port
        self._grpc.start()
        for parts in self.parts:
            for loop in parts.background:
                loop.start()
            if parts.handlers:
                worker = EventWorker(
                    group=parts.name,
                    bus=self.runtime.bus,
                    store=self.runtime.store,
                    handlers=parts.handlers,
                    coalesce=parts.coalesce,
                    stopping=self.runtime.stopping,
                    max_attempts=self.settings.max_attempts,
                    backoff=self.settings.retry_backoff,
                    stall_seconds=self.settings.stall_seconds,
                )
                worker.start()
                self.workers.append(worker)
        self._check_health()
        self._checker = threading.Thread(target=self._health_loop, name="health", daemon=True)
        self._checker.start()
        for companion in self.companions:
            companion.start()
        log.info(
            "serving %s on %s:%d (%s; metrics on :%d, %s bus, %s artifacts)",
            ",".join(self.names),
            self.settings.grpc_host,
            self.port,
            _tls_mode(self.settings),
            self.metrics_port,
            self.settings.bus_backend,
            self.settings.artifact_backend,
        )

    def _health_loop(self) -> None:
        while not self._stopped.wait(_CHECK_INTERVAL):
            self._check_health()

    def _check_health(self) -> None:
        shared = [self.runtime.bus.ping, self.runtime.store.ping]
        stalled = {w.group: w.check_stalled for w in self.workers}
        for parts in self.parts:
            ok = True
            own = [stalled[parts.name]] if parts.name in stalled else []
            for check in [*shared, *parts.checks, *own]:
                try:
                    check()
                except HistoloopError as exc:
                    ok = False
                    log.warning("%s not serving: %s", parts.name, exc)
                    break
            if not self._stopped.is_set():
                self.health.set(parts.grpc_service, _status(ok))

    # stop ----------------------------------------------------------------------------
    def stop(self, grace: float | None = None) -> None:
        """Stop taking work, let in-flight RPCs and events finish, release everything.

        Safe to call twice (and from a signal handler thread).
        """
        with self._stop_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        grace = self.settings.grace_seconds if grace is None else grace
        log.info("shutting down (grace %.1fs)", grace)
        self.health.enter_graceful_shutdown()
        self.runtime.stopping.set()
        for companion in self.companions:
            companion.stop(grace)
        done = self._grpc.stop(grace)
        for worker in self.workers:
            worker.stop(grace)
        for parts in self.parts:
            for loop in parts.background:
                loop.stop(grace)
        done.wait(grace)
        for parts in self.parts:
            parts.close()
        self.runtime.bus.close()
        self.runtime.store.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("stopped")

    def wait(self) -> None:
        """Block until :meth:`stop` has been called."""
        self._stopped.wait()

    def serve_until_signal(self) -> None:
        """Start, then block until SIGTERM or SIGINT, then stop gracefully."""
        stop_requested = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop_requested.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        settle_heap()
        stop_requested.wait()
        self.stop()


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port from ``tls_cert``/``tls_key`` (None: plaintext).

    With ``tls_client_ca`` the server also requires a client certificate signed by that CA
    (mutual TLS).

    Raises:
        ConfigError: only one of certificate and key is set, a client CA without a server
            certificate, or a file that cannot be read (the message names the variable).
    """
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.tls_client_ca is not None:
            raise ConfigError(
                "HISTOLOOP_TLS_CLIENT_CA (mutual TLS) needs HISTOLOOP_TLS_CERT and "
                "HISTOLOOP_TLS_KEY (server TLS) as well"
            )
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ConfigError("TLS needs both HISTOLOOP_TLS_CERT and HISTOLOOP_TLS_KEY")
    cert = _read_pem("HISTOLOOP_TLS_CERT", settings.tls_cert)
    key = _read_pem("HISTOLOOP_TLS_KEY", settings.tls_key)
    client_ca = (
        _read_pem("HISTOLOOP_TLS_CLIENT_CA", settings.tls_client_ca)
        if settings.tls_client_ca is not None
        else None
    )
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _read_pem(variable: str, path: Path) -> bytes:
    try:
        data = path.expanduser().read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"{variable}: {path} is not a PEM file")
    return data


def _tls_mode(settings: Settings) -> str:
    if settings.tls_cert is None:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca is not None else "TLS"


def _status(ok: bool) -> int:
    return (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )
