"""docker-compose.yml: valid Compose, health-gated start order, required secrets, GPU/CPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from .conftest import (
    COMPOSE_FILE,
    MONITORING,
    REPO,
    SERVICES,
    MissingVariable,
    compose_secret_variables,
    interpolate,
)

SCHEMA = Path(__file__).with_name("schemas") / "compose-spec.json"
HISTOLOOP_SERVICES = [*SERVICES, "embedding-cpu"]
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER")


def _images(compose: dict[str, Any]) -> dict[str, str]:
    return {name: svc["image"] for name, svc in compose["services"].items()}


def test_compose_file_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft201909Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert not errors, "\n".join(errors)


@pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed"
)
def test_docker_compose_config_accepts_the_file(
    compose_env: dict[str, str], tmp_path: Path
) -> None:
    env = {**{k: v for k, v in os.environ.items() if k not in compose_env}, **compose_env}
    args = ["docker-compose", "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    for profiles in ([], ["--profile", "gpu"], ["--profile", "cpu"]):
        done = subprocess.run(
            [*args, *profiles, "config", "-q"], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
    # without the secrets it refuses to start, naming the variable
    bare = {k: v for k, v in env.items() if k not in compose_env}
    done = subprocess.run(
        [*args, "config", "-q"], env=bare, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert any(name in done.stderr for name in compose_env), done.stderr


def test_secrets_are_required_and_have_no_defaults(compose_raw: dict[str, Any]) -> None:
    required = compose_secret_variables(compose_raw)
    assert {
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "HISTOLOOP_MINIO_ACCESS_KEY",
        "HISTOLOOP_MINIO_SECRET_KEY",
        "POSTGRES_PASSWORD",
        "HISTOLOOP_SERVICE_TOKEN",
        "HISTOLOOP_ADMIN_TOKEN",
        "GRAFANA_ADMIN_PASSWORD",
    } <= required
    for name in required:
        with pytest.raises(MissingVariable, match=name):
            interpolate(compose_raw, {other: "x" for other in required if other != name})

    # every secret-looking setting is a required variable, never a literal or a default
    for service_name, service in compose_raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) or key == "HISTOLOOP_DATABASE_URL":
                assert isinstance(value, str) and re.search(r"\$\{[A-Z0-9_]+:\?", value), (
                    f"{service_name}: {key} must come from a required ${{VAR:?message}}, not {value!r}"
                )


def test_every_histoloop_setting_is_a_real_setting(compose: dict[str, Any]) -> None:
    from histoloop.config import Settings

    fields = {f"HISTOLOOP_{name.upper()}" for name in Settings.model_fields}
    for name in HISTOLOOP_SERVICES + ["migrate"]:
        unknown = {
            k for k in compose["services"][name]["environment"] if k.startswith("HISTOLOOP_")
        } - fields
        assert not unknown, f"{name}: {unknown} are not histoloop settings"


@pytest.mark.parametrize("service", HISTOLOOP_SERVICES)
def test_each_service_has_every_setting_it_needs(
    service: str, compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from histoloop.config import load_settings

    for key in [k for k in os.environ if k.startswith("HISTOLOOP_")]:
        monkeypatch.delenv(key)
    for key, value in compose["services"][service]["environment"].items():
        monkeypatch.setenv(key, str(value))
    settings = load_settings()
    settings.validate_for_start(compose["services"][service]["command"][-1].replace("-", "_"))
    assert settings.mode == "distributed"
    assert settings.grpc_host == "0.0.0.0"


def test_start_order_is_gated_by_health(compose: dict[str, Any]) -> None:
    services = compose["services"]

    def condition(name: str, dependency: str) -> str:
        return services[name]["depends_on"][dependency]["condition"]

    assert services["migrate"]["command"] == ["migrate"]
    assert condition("migrate", "postgres") == "service_healthy"
    assert condition("annotation-store", "migrate") == "service_completed_successfully"
    assert condition("minio-init", "minio") == "service_healthy"
    assert condition("embedding", "triton") == "service_healthy"
    for name in HISTOLOOP_SERVICES:
        assert condition(name, "kafka") == "service_healthy", name
        assert condition(name, "minio-init") == "service_completed_successfully", name
    # a service_healthy dependency needs a health check to become healthy at all
    for name, service in services.items():
        for dependency, spec in (service.get("depends_on") or {}).items():
            if spec["condition"] == "service_healthy":
                check = services[dependency].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dependency}'s health"
                )


@pytest.mark.parametrize("service", HISTOLOOP_SERVICES)
def test_histoloop_services_are_health_checked_and_hardened(
    service: str, compose: dict[str, Any]
) -> None:
    spec = compose["services"][service]
    component = spec["command"][-1]
    assert spec["command"][0] == "run"
    grpc_service = SERVICES[component][1]
    assert spec["healthcheck"]["test"][:3] == ["CMD", "histoloop", "health"]
    assert spec["healthcheck"]["test"][-2:] == ["--service", grpc_service]
    assert spec["read_only"] is True
    assert spec["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in spec["security_opt"]
    assert spec["build"]["dockerfile"] == "deploy/Dockerfile"
    assert spec["environment"]["HISTOLOOP_MODE"] == "distributed"
    assert spec["environment"]["HISTOLOOP_KAFKA_BOOTSTRAP"] == "kafka:9092"


def test_triton_reserves_a_gpu_and_the_cpu_profile_replaces_it(compose: dict[str, Any]) -> None:
    services = compose["services"]
    triton = services["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert triton["profiles"] == ["gpu"]
    assert triton["shm_size"]
    assert "./deploy/triton:/models:ro" in triton["volumes"]
    assert services["embedding"]["profiles"] == ["gpu"]
    assert services["embedding"]["environment"]["HISTOLOOP_EMBEDDER"] == "triton"

    cpu = services["embedding-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "triton" not in cpu["depends_on"]
    assert cpu["environment"]["HISTOLOOP_EMBEDDER"] == "onnx"
    assert cpu["environment"]["HISTOLOOP_MODEL_PATH"].startswith("/models/")
    assert cpu["networks"]["default"]["aliases"] == ["embedding"]
    # nothing else is profile-bound: the rest starts with either profile
    bound = {name for name, spec in services.items() if spec.get("profiles")}
    assert bound == {"triton", "embedding", "embedding-cpu"}


def test_kafka_runs_in_kraft_mode_without_zookeeper(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert not any(
        "zookeeper" in name or "zookeeper" in spec["image"] for name, spec in services.items()
    )
    env = services["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert "kafka-data:/var/lib/kafka/data" in services["kafka"]["volumes"]


def test_state_lives_in_volumes(compose: dict[str, Any]) -> None:
    volumes = set(compose["volumes"])
    assert {
        "kafka-data",
        "minio-data",
        "postgres-data",
        "prometheus-data",
        "grafana-data",
    } <= volumes
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./"):
                continue
            assert source.startswith("/") or source in volumes, (
                f"{name}: volume {source} is not declared"
            )


def test_minio_bucket_is_created_once(compose: dict[str, Any]) -> None:
    init = compose["services"]["minio-init"]
    assert init["restart"] == "no"
    script = init["command"][0]
    assert 'mc mb --ignore-existing "local/$BUCKET"' in script
    assert "mc admin user add" in script


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, image in _images(compose).items():
        reference = image.rsplit("/", 1)[-1]
        assert ":" in reference or "@sha256:" in image, f"{name}: {image} has no tag"
        assert not reference.endswith(":latest"), f"{name}: {image} uses latest"


def test_monitoring_is_wired(compose: dict[str, Any]) -> None:
    services = compose["services"]
    prometheus = services["prometheus"]
    mounts = prometheus["volumes"]
    assert "./deploy/monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts
    assert "./deploy/monitoring/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts
    grafana = services["grafana"]
    assert (
        "./deploy/monitoring/grafana/provisioning:/etc/grafana/provisioning:ro"
        in grafana["volumes"]
    )
    assert "./deploy/monitoring/grafana/dashboards:/etc/grafana/dashboards:ro" in grafana["volumes"]
    provider = yaml.safe_load(
        (MONITORING / "grafana/provisioning/dashboards/histoloop.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dashboard_home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (MONITORING / "grafana/dashboards" / Path(dashboard_home).name).is_file()

    # Prometheus scrapes every histoloop service by its compose name, Triton and Kafka
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    histoloop_names = set(jobs["histoloop"]["dns_sd_configs"][0]["names"])
    assert histoloop_names == set(SERVICES)
    assert set(SERVICES) <= set(services)
    assert jobs["triton"]["dns_sd_configs"][0]["names"] == ["triton"]
    assert jobs["triton"]["dns_sd_configs"][0]["port"] == 8002
    assert jobs["kafka"]["static_configs"][0]["targets"] == ["kafka-exporter:9308"]
    assert "kafka-exporter" in services


def test_bind_mounted_files_exist(compose: dict[str, Any]) -> None:
    # deploy/triton (model repository) and ./data (slides) are provided by the operator
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("./deploy/") and not source.startswith("./deploy/triton"):
                assert (REPO / source).exists(), f"{name}: {source} does not exist"


def test_env_example_lists_every_required_variable(compose_raw: dict[str, Any]) -> None:
    example = (REPO / "deploy" / "compose.env.example").read_text().splitlines()
    listed = {line.split("=", 1)[0] for line in example if "=" in line and not line.startswith("#")}
    assert compose_secret_variables(compose_raw) <= listed
    assert all(
        line.endswith("=")
        for line in example
        if "=" in line and not line.startswith(("#", "COMPOSE_PROFILES"))
    ), "no values in the example"
