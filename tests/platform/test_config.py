"""Settings: nothing needed embedded; distributed fails fast naming what is missing."""

from __future__ import annotations

import pytest

from histoloop.config import load_settings
from histoloop.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("HISTOLOOP_") and name != "HISTOLOOP_SHARED_DATA":
            monkeypatch.delenv(name)


def test_embedded_needs_no_settings(tmp_path) -> None:
    settings = load_settings(data_dir=tmp_path)
    settings.validate_for_start()
    assert (settings.bus_backend, settings.artifact_backend, settings.auth_mode) == (
        "embedded",
        "local",
        "off",
    )
    assert settings.embedder_backend == "efficientnet"  # pretrained, offline; never handcrafted
    assert settings.sqlalchemy_url.startswith("sqlite:///")


def test_distributed_names_every_missing_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HISTOLOOP_MODE", "distributed")
    with pytest.raises(ConfigError) as err:
        load_settings().validate_for_start()
    for name in (
        "HISTOLOOP_KAFKA_BOOTSTRAP",
        "HISTOLOOP_MINIO_ENDPOINT",
        "HISTOLOOP_MINIO_ACCESS_KEY",
        "HISTOLOOP_MINIO_SECRET_KEY",
        "HISTOLOOP_DATABASE_URL",
        "HISTOLOOP_TRITON_URL",
        "HISTOLOOP_SERVICE_TOKEN",
    ):
        assert name in str(err.value)


def test_one_service_needs_only_its_own_dependencies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {
        "MODE": "distributed",
        "KAFKA_BOOTSTRAP": "k:9092",
        "MINIO_ENDPOINT": "m:9000",
        "MINIO_ACCESS_KEY": "histoloop",
        "MINIO_SECRET_KEY": "s3cr3t-value",
        "SERVICE_TOKEN": "tok-123456",
    }.items():
        monkeypatch.setenv("HISTOLOOP_" + name, value)
    load_settings().validate_for_start("training")
    with pytest.raises(ConfigError, match="HISTOLOOP_DATABASE_URL"):
        load_settings().validate_for_start("annotation_store")
    with pytest.raises(ConfigError, match="HISTOLOOP_TRITON_URL"):
        load_settings().validate_for_start("embedding")


@pytest.mark.parametrize("placeholder", ["minioadmin", "changeme", ""])
def test_placeholder_secrets_are_rejected(
    monkeypatch: pytest.MonkeyPatch, placeholder: str
) -> None:
    monkeypatch.setenv("HISTOLOOP_ARTIFACTS", "minio")
    monkeypatch.setenv("HISTOLOOP_MINIO_ENDPOINT", "m:9000")
    monkeypatch.setenv("HISTOLOOP_MINIO_ACCESS_KEY", "histoloop")
    monkeypatch.setenv("HISTOLOOP_MINIO_SECRET_KEY", placeholder)
    with pytest.raises(ConfigError, match="HISTOLOOP_MINIO_SECRET_KEY"):
        load_settings().validate_for_start()


def test_bad_values_and_files_name_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HISTOLOOP_GRPC_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="HISTOLOOP_GRPC_PORT"):
        load_settings()
    monkeypatch.delenv("HISTOLOOP_GRPC_PORT")
    with pytest.raises(ConfigError, match="HISTOLOOP_CONFIG_FILE"):
        load_settings(tmp_path / "missing.env")
    env = tmp_path / "histoloop.env"
    env.write_text("HISTOLOOP_GRPC_PORT=6000\nHISTOLOOP_BUS=kafka\nHISTOLOOP_KAFKA_BOOTSTRAP=k:1\n")
    settings = load_settings(env)
    assert (settings.grpc_port, settings.bus_backend, settings.kafka_bootstrap) == (
        6000,
        "kafka",
        "k:1",
    )


def test_unknown_setting_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    env = tmp_path / "histoloop.env"
    env.write_text("HISTOLOOP_GRPC_PROT=6000\n")
    with pytest.raises(ConfigError, match="GRPC_PROT"):
        load_settings(env)
