"""The distributed stack on one machine: real dependencies and six service processes.

:func:`start_stack` starts, in this order,

* librdkafka's mock Kafka cluster (a helper process; real Kafka wire protocol),
* moto's S3 server (a real S3 HTTP endpoint),
* a fresh PostgreSQL database on the local server (dropped at the end),
* a real ``tritonserver`` (pytriton, CPU) serving a small ONNX CNN whose input is the
  tiling patch size (224 px),
* TLS material (a CA, a server/client certificate for 127.0.0.1) when ``tls`` is on,
* each of the six services as its own ``histoloop run <service>`` process, configured only
  through ``HISTOLOOP_*`` environment variables, each behind its own switchable TCP proxy
  to S3 (and the embedding service behind one to Triton), so a test can cut one service
  off from a dependency while the dependency keeps its state.

Then it polls each service's gRPC health (readiness) until SERVING. Every service writes
its log to ``<root>/logs/<service>.log`` (appended across restarts);
:meth:`Stack.logs` returns them for failure reports and the credential check.

No pytest in here: ``tests/e2e/conftest.py`` wraps it in fixtures, and
``benchmarks/bench_load.py`` and ``tests/e2e/run_stack.py`` use it directly.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histoloop.artifacts.s3 import MinioArtifactStore
from histoloop.channels import make_channel
from histoloop.config import Settings
from histoloop.runtime import SERVICE_NAMES
from histoloop.v1 import (
    acquisition_pb2_grpc,
    annotation_store_pb2_grpc,
    embedding_pb2_grpc,
    prediction_pb2_grpc,
    tiling_pb2_grpc,
    training_pb2_grpc,
)
from tests.e2e.proxy import TcpProxy
from tests.fixtures.kafka import MockKafka, start_mock_kafka
from tests.fixtures.s3 import S3Server, free_port, start_moto_s3
from tests.fixtures.triton import TritonServer, onnx_model_spec, serve_models

__all__ = [
    "GRPC_SERVICES",
    "PATCH_SIZE",
    "TRITON_MODEL",
    "ServiceProcess",
    "Stack",
    "TlsFiles",
    "make_tls",
    "start_stack",
]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
HISTOLOOP = Path(sys.executable).with_name("histoloop")
GRPC_SERVICES = {
    "annotation_store": "histoloop.v1.AnnotationStoreService",
    "tiling": "histoloop.v1.TilingService",
    "embedding": "histoloop.v1.EmbeddingService",
    "training": "histoloop.v1.TrainingService",
    "prediction": "histoloop.v1.PredictionService",
    "acquisition": "histoloop.v1.AcquisitionService",
}
TRITON_MODEL = "e2e-cnn"
TRITON_DIM = 16
PATCH_SIZE = 224
"""The tiling service's patch size, so the Triton model's input."""
# On Linux each service is started through a one-line exec wrapper that asks the kernel for
# SIGTERM when the test process dies (PR_SET_PDEATHSIG, kept across exec), so no service
# outlives a killed test run. (Not preexec_fn: running Python between fork and exec in a
# process with threads — gRPC, Kafka, Triton clients here — can abort the child.)
_DIE_WITH_PARENT: tuple[str, ...] = (
    (
        sys.executable,
        "-c",
        "import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
        "os.execv(sys.argv[1], sys.argv[1:])",
    )
    if sys.platform.startswith("linux")
    else ()
)
PG_CONNINFO = os.environ.get(
    "HISTOLOOP_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=test"
)


# TLS -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway PKI: one CA, a server/client certificate it signed, and a
    certificate from a different CA (which the servers must not accept)."""

    ca: Path
    cert: Path
    key: Path
    rogue_cert: Path
    rogue_key: Path


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _certificate(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def make_tls(folder: Path) -> TlsFiles:
    """Generate a CA and a certificate for 127.0.0.1/localhost (server and client use)."""
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    ca_key, rogue_ca_key, key, rogue_key = _key(), _key(), _key(), _key()
    ca = _certificate("histoloop test CA", ca_key, "histoloop test CA", ca_key, ca=True)
    cert = _certificate("histoloop-service", key, "histoloop test CA", ca_key, ca=False)
    rogue = _certificate("rogue-client", rogue_key, "rogue CA", rogue_ca_key, ca=False)
    files = TlsFiles(
        ca=folder / "ca.pem",
        cert=folder / "cert.pem",
        key=folder / "key.pem",
        rogue_cert=folder / "rogue-cert.pem",
        rogue_key=folder / "rogue-key.pem",
    )
    files.ca.write_bytes(ca.public_bytes(pem))
    files.cert.write_bytes(cert.public_bytes(pem))
    files.key.write_bytes(_pem_key(key))
    files.rogue_cert.write_bytes(rogue.public_bytes(pem))
    files.rogue_key.write_bytes(_pem_key(rogue_key))
    for path in (files.key, files.rogue_key):
        path.chmod(0o600)
    return files


# services ------------------------------------------------------------------------------------
@dataclass
class ServiceProcess:
    """One ``histoloop run <service>`` process, restartable on the same ports."""

    name: str
    env: dict[str, str]
    log_path: Path
    port: int
    metrics_port: int
    process: subprocess.Popen[bytes] | None = None
    exit_codes: list[int] = field(default_factory=list)
    """Exit status of each ended run (negative: killed by that signal)."""

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_service(self) -> str:
        """Full gRPC name (the health service's readiness key)."""
        return GRPC_SERVICES[self.name]

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the process (no-op when it runs); its stderr and stdout go to the log."""
        if self.running:
            return
        with open(self.log_path, "ab") as fh:
            fh.write(f"\n===== start {self.name} at {time.strftime('%H:%M:%S')} =====\n".encode())
            fh.flush()
            self.process = subprocess.Popen(
                [*_DIE_WITH_PARENT, str(HISTOLOOP), "run", self.name],
                env=self.env,
                cwd=str(REPO),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def signal(self, signum: int) -> None:
        """Send a signal to the process."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait for the process to end; its exit status (raises TimeoutExpired)."""
        assert self.process is not None
        rc = self.process.wait(timeout)
        self.exit_codes.append(rc)
        self.process = None
        return rc

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for a graceful exit; SIGKILL if it hangs. The exit status."""
        if self.process is None:
            return self.exit_codes[-1] if self.exit_codes else 0
        self.signal(signal.SIGTERM)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.wait(10)
            raise

    def kill(self) -> int:
        """SIGKILL (no chance to clean up); the exit status."""
        if self.process is None:
            return self.exit_codes[-1] if self.exit_codes else 0
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def log_text(self) -> str:
        """Everything the process wrote so far (all its runs)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Stack:
    """A running distributed stack and what tests need to reach into it."""

    root: Path
    kafka: MockKafka
    s3: S3Server
    triton: TritonServer
    triton_proxy: TcpProxy
    s3_proxies: dict[str, TcpProxy]
    services: dict[str, ServiceProcess]
    settings: Settings
    """Client settings: TLS files and the service token (what ``make_channel`` needs)."""
    admin_token: str
    service_token: str
    database: str
    database_url: str
    secrets: dict[str, str]
    """Secret values handed to the services (must never appear in their logs)."""
    topic_prefix: str
    bucket: str
    tls: TlsFiles | None = None
    _channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)

    # clients -----------------------------------------------------------------------------------
    def channel(self, service: str, token: str | None = None) -> grpc.Channel:
        """A (cached) channel to ``service`` carrying ``token`` (default: the admin token)."""
        token = self.admin_token if token is None else token
        key = (service, token)
        if key not in self._channels:
            self._channels[key] = make_channel(
                self.services[service].address, self.settings, token=token
            )
        return self._channels[key]

    def store_stub(
        self, token: str | None = None
    ) -> annotation_store_pb2_grpc.AnnotationStoreServiceStub:
        """The annotation store's stub."""
        return annotation_store_pb2_grpc.AnnotationStoreServiceStub(
            self.channel("annotation_store", token)
        )

    def training_stub(self, token: str | None = None) -> training_pb2_grpc.TrainingServiceStub:
        """The training service's stub."""
        return training_pb2_grpc.TrainingServiceStub(self.channel("training", token))

    def prediction_stub(
        self, token: str | None = None
    ) -> prediction_pb2_grpc.PredictionServiceStub:
        """The prediction service's stub."""
        return prediction_pb2_grpc.PredictionServiceStub(self.channel("prediction", token))

    def acquisition_stub(
        self, token: str | None = None
    ) -> acquisition_pb2_grpc.AcquisitionServiceStub:
        """The acquisition service's stub."""
        return acquisition_pb2_grpc.AcquisitionServiceStub(self.channel("acquisition", token))

    def embedding_stub(self, token: str | None = None) -> embedding_pb2_grpc.EmbeddingServiceStub:
        """The embedding service's stub."""
        return embedding_pb2_grpc.EmbeddingServiceStub(self.channel("embedding", token))

    def tiling_stub(self, token: str | None = None) -> tiling_pb2_grpc.TilingServiceStub:
        """The tiling service's stub."""
        return tiling_pb2_grpc.TilingServiceStub(self.channel("tiling", token))

    def close_channels(self) -> None:
        """Close every cached channel."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()

    def artifacts(self) -> MinioArtifactStore:
        """A client of the artifact store straight to S3 (no proxy), as the services see it."""
        return MinioArtifactStore(
            self.s3.endpoint,
            access_key=self.s3.access_key,
            secret_key=self.secrets["minio_secret_key"],
            bucket=self.bucket,
            region=self.s3.region,
        )

    def sql(self, query: str, *params: object) -> list[tuple]:
        """Rows of a query on the annotation store's database."""
        with psycopg.connect(_conninfo_for(self.database), autocommit=True) as conn:
            return list(conn.execute(query, params).fetchall())  # type: ignore[arg-type]

    # health ------------------------------------------------------------------------------------
    def health(self, service: str, timeout: float = 3.0) -> int:
        """The readiness status of one service (SERVING, NOT_SERVING, or UNKNOWN if down)."""
        try:
            reply = health_pb2_grpc.HealthStub(self.channel(service, "")).Check(
                health_pb2.HealthCheckRequest(service=GRPC_SERVICES[service]), timeout=timeout
            )
        except grpc.RpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN
        return reply.status

    def wait_ready(self, names: list[str] | None = None, timeout: float = 120.0) -> None:
        """Poll health until every named service reports SERVING.

        Raises:
            RuntimeError: a process died, or a service is not ready in time (its log attached).
        """
        pending = list(names or self.services)
        deadline = time.monotonic() + timeout
        while pending:
            for name in list(pending):
                proc = self.services[name]
                if not proc.running:
                    raise RuntimeError(
                        f"service {name} exited (rc={proc.process and proc.process.poll()}) "
                        f"before it was ready:\n{_tail(proc.log_text())}"
                    )
                if self.health(name, timeout=2.0) == health_pb2.HealthCheckResponse.SERVING:
                    pending.remove(name)
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"services not SERVING within {timeout:.0f}s: {pending}\n"
                    + "\n".join(
                        f"--- {n} ---\n{_tail(self.services[n].log_text())}" for n in pending
                    )
                )
            if pending:
                time.sleep(0.3)

    def logs(self) -> dict[str, str]:
        """Every service's log so far."""
        return {name: proc.log_text() for name, proc in self.services.items()}

    def restart(self, name: str, timeout: float = 120.0) -> None:
        """Start a stopped (or killed) service again and wait until it is ready."""
        self.services[name].start()
        self.wait_ready([name], timeout)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _conninfo_for(database: str) -> str:
    parts = dict(p.split("=", 1) for p in PG_CONNINFO.split())
    parts["dbname"] = database
    return " ".join(f"{k}={v}" for k, v in parts.items())


def _pg_url(database: str, password: str) -> str:
    parts = dict(p.split("=", 1) for p in PG_CONNINFO.split())
    # the server trusts local connections, so any password works; it is there to be kept secret
    return (
        f"postgresql+psycopg://{parts.get('user', 'postgres')}:{password}@"
        f"{parts.get('host', '127.0.0.1')}:{parts.get('port', '5432')}/{database}"
    )


@contextmanager
def _database() -> Iterator[str]:
    name = f"histoloop_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]
    try:
        yield name
    finally:
        with psycopg.connect(PG_CONNINFO, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]


def export_triton_model(repository: Path) -> Path:
    """The e2e CNN (tests/embedding/models.py) exported to ONNX by the repository's export tool."""
    import importlib.util

    from tests.embedding.models import small_cnn

    onnx_file = repository / TRITON_MODEL / "1" / "model.onnx"
    if onnx_file.exists():
        return onnx_file
    spec = importlib.util.spec_from_file_location(
        "histoloop_export_model", REPO / "tools" / "export_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.export_module(
        small_cnn(TRITON_DIM),
        repository,
        TRITON_MODEL,
        input_size=PATCH_SIZE,
        max_batch_size=16,
        instance_kind="KIND_CPU",
    )
    return onnx_file


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HISTOLOOP_")}
    # six services and Triton share the cores: one compute thread each
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1"
    )
    return env


@contextmanager
def start_stack(
    root: Path,
    *,
    tls: bool = True,
    mutual_tls: bool = True,
    services: tuple[str, ...] = SERVICE_NAMES,
    ready_timeout: float = 180.0,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Start the dependencies and the services; yield the :class:`Stack`; stop everything.

    Args:
        root: a folder for logs, TLS files, the Triton model and the services' data dirs.
        tls: serve gRPC over TLS (certificates generated here).
        mutual_tls: also require client certificates.
        services: which services to start as processes.
        ready_timeout: seconds for all of them to report SERVING.
        extra_env: more ``HISTOLOOP_*`` settings for every service.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "logs").mkdir(exist_ok=True)
    with ExitStack() as stack:
        kafka = stack.enter_context(start_mock_kafka())
        s3 = stack.enter_context(start_moto_s3())
        database = stack.enter_context(_database())
        onnx_file = export_triton_model(root / "model-repo")
        triton = stack.enter_context(serve_models([onnx_model_spec(TRITON_MODEL, onnx_file)]))
        triton_proxy = TcpProxy(triton.grpc_url, name="triton")
        stack.callback(triton_proxy.close)
        s3_proxies = {}
        for name in services:
            s3_proxies[name] = TcpProxy(s3.endpoint, name=f"s3-{name}")
            stack.callback(s3_proxies[name].close)

        tls_files = make_tls(root / "tls") if tls else None
        secret = {
            "minio_secret_key": "minio-" + secrets.token_urlsafe(18),
            "db_password": "pg-" + secrets.token_urlsafe(18),
            "service_token": "svc-" + secrets.token_urlsafe(18),
            "admin_token": "adm-" + secrets.token_urlsafe(18),
        }
        prefix = f"e2e{uuid.uuid4().hex[:6]}."
        bucket = f"histoloop-e2e-{uuid.uuid4().hex[:8]}"
        db_url = _pg_url(database, secret["db_password"])
        common = {
            "HISTOLOOP_MODE": "distributed",
            "HISTOLOOP_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "HISTOLOOP_KAFKA_API_VERSION": "2.3",
            "HISTOLOOP_KAFKA_SESSION_TIMEOUT_MS": "4000",
            "HISTOLOOP_KAFKA_TOPIC_PREFIX": prefix,
            "HISTOLOOP_MINIO_ACCESS_KEY": s3.access_key,
            "HISTOLOOP_MINIO_SECRET_KEY": secret["minio_secret_key"],
            "HISTOLOOP_MINIO_BUCKET": bucket,
            "HISTOLOOP_MINIO_REGION": s3.region,
            "HISTOLOOP_SERVICE_TOKEN": secret["service_token"],
            "HISTOLOOP_ADMIN_TOKEN": secret["admin_token"],
            "HISTOLOOP_GRACE_SECONDS": "8",
            "HISTOLOOP_GRPC_HOST": "127.0.0.1",
            "HISTOLOOP_LOG_LEVEL": "INFO",
        }
        if tls_files is not None:
            common.update(
                HISTOLOOP_TLS_CERT=str(tls_files.cert),
                HISTOLOOP_TLS_KEY=str(tls_files.key),
                HISTOLOOP_TLS_CA=str(tls_files.ca),
            )
            if mutual_tls:
                common["HISTOLOOP_TLS_CLIENT_CA"] = str(tls_files.ca)
        common.update(extra_env or {})
        procs: dict[str, ServiceProcess] = {}
        for name in services:
            env = {
                **_base_env(),
                **common,
                "HISTOLOOP_MINIO_ENDPOINT": s3_proxies[name].address,
                "HISTOLOOP_GRPC_PORT": str(free_port()),
                "HISTOLOOP_METRICS_PORT": str(free_port()),
                "HISTOLOOP_DATA_DIR": str(root / "data" / name),
            }
            if name == "annotation_store":
                env["HISTOLOOP_DATABASE_URL"] = db_url
            if name == "embedding":
                env.update(
                    HISTOLOOP_TRITON_URL=triton_proxy.address, HISTOLOOP_TRITON_MODEL=TRITON_MODEL
                )
            procs[name] = ServiceProcess(
                name=name,
                env=env,
                log_path=root / "logs" / f"{name}.log",
                port=int(env["HISTOLOOP_GRPC_PORT"]),
                metrics_port=int(env["HISTOLOOP_METRICS_PORT"]),
            )
        client_settings = Settings(
            tls_ca=tls_files.ca if tls_files else None,
            tls_cert=tls_files.cert if tls_files and mutual_tls else None,
            tls_key=tls_files.key if tls_files and mutual_tls else None,
            service_token=secret["service_token"],
        )
        result = Stack(
            root=root,
            kafka=kafka,
            s3=s3,
            triton=triton,
            triton_proxy=triton_proxy,
            s3_proxies=s3_proxies,
            services=procs,
            settings=client_settings,
            admin_token=secret["admin_token"],
            service_token=secret["service_token"],
            database=database,
            database_url=db_url,
            secrets=secret,
            topic_prefix=prefix,
            bucket=bucket,
            tls=tls_files,
        )

        def stop_services() -> None:
            result.close_channels()
            for proc in procs.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.terminate(timeout=20)

        stack.callback(stop_services)
        # the annotation store migrates the database at start; the others wait on nothing
        for proc in procs.values():
            proc.start()
        result.wait_ready(timeout=ready_timeout)
        yield result
