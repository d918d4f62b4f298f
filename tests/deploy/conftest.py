"""Fixtures of the deployment checks: the compose file, the rendered Helm chart, a scrape.

Nothing here needs a Docker engine, a cluster or the network. The Helm chart is rendered
by Helm's own Go engine through ``helm-python-sdk`` (libhelm_c, no helm binary); the
Kubernetes schemas come with ``kubernetes-validate``; the Compose Specification schema is
vendored under ``schemas/``.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "histoloop"
COMPOSE_FILE = REPO / "docker-compose.yml"
MONITORING = REPO / "deploy" / "monitoring"

# The six services: compose/Kubernetes name → (values key, full gRPC service name).
SERVICES: dict[str, tuple[str, str]] = {
    "annotation-store": ("annotationStore", "histoloop.v1.AnnotationStoreService"),
    "tiling": ("tiling", "histoloop.v1.TilingService"),
    "embedding": ("embedding", "histoloop.v1.EmbeddingService"),
    "training": ("training", "histoloop.v1.TrainingService"),
    "prediction": ("prediction", "histoloop.v1.PredictionService"),
    "acquisition": ("acquisition", "histoloop.v1.AcquisitionService"),
}

# Values every install against external dependencies must give (no defaults exist).
REQUIRED_VALUES: dict[str, Any] = {
    "config": {
        "kafkaBootstrap": "kafka-0.kafka.facility.svc:9092",
        "minioEndpoint": "minio.facility.svc:9000",
    },
    "secrets": {
        "minioAccessKey": "histoloop-services",
        "minioSecretKey": "b3c1d0e8f2a94c7d",
        "databaseUrl": "postgresql+psycopg://histoloop:9f8e7d6c@pg.facility.svc:5432/histoloop",
        "serviceToken": "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    },
}

# Value sets the chart must render with (besides the required values above).
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-off": {"triton": {"gpu": {"enabled": False}}},
    "bundled": {
        "config": {"kafkaBootstrap": "", "minioEndpoint": ""},
        "secrets": {"databaseUrl": ""},
        "bundled": {
            "kafka": {"enabled": True},
            "minio": {
                "enabled": True,
                "rootUser": "histoloop-admin",
                "rootPassword": "6a5b4c3d2e1f0a9b",
            },
            "postgresql": {"enabled": True, "password": "7c6d5e4f3a2b1c0d"},
        },
    },
    "servicemonitor": {
        "metrics": {
            "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
            "prometheusRule": {"enabled": True},
            "grafanaDashboard": {"enabled": True},
        },
    },
    "production": {
        "secrets": {
            "existingSecret": "histoloop-credentials",
            "minioAccessKey": "",
            "minioSecretKey": "",
            "databaseUrl": "",
            "serviceToken": "",
        },
        "networkPolicy": {
            "enabled": True,
            "grpcFrom": [{"podSelector": {"matchLabels": {"app": "viewer"}}}],
        },
        "web": {
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "host": "histoloop.facility.example.org",
                "from": [
                    {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}
                        }
                    }
                ],
            }
        },
        "annotationStore": {"replicas": 2},
        "tiling": {"autoscaling": {"enabled": True}},
        "embedding": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 8}},
        "triton": {
            "replicas": 2,
            "modelRepository": {"source": "pvc", "existingClaim": "triton-models"},
            "image": {"repository": "nvcr.io/nvidia/tritonserver", "tag": "24.08-py3"},
        },
        "image": {"digest": "sha256:" + "0" * 64},
    },
}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` merged into a copy of ``base`` (nested mappings merge, the rest replaces)."""
    merged: dict[str, Any] = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


Renderer = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm() -> Any:
    """Helm's Go engine (helm-python-sdk); the binary is not needed."""
    return pytest.importorskip("helm_python", reason="helm-python-sdk renders the chart")


@pytest.fixture(scope="session")
def render_chart(helm: Any) -> Iterator[Renderer]:
    """``render_chart(values, release="rel")`` → the rendered manifests as dicts, with the
    template path under the key ``__template__``. Values are merged over nothing: pass
    REQUIRED_VALUES yourself where needed."""
    chart = helm.Chart.load(str(CHART))

    def render(
        values: Mapping[str, Any] | None = None,
        *,
        release: str = "rel",
        namespace: str = "histoloop",
    ) -> list[dict[str, Any]]:
        rendered = chart.render(
            dict(values or {}), name=release, namespace=namespace, is_install=True
        )
        docs: list[dict[str, Any]] = []
        for template, text in sorted(rendered.items()):
            if not template.endswith((".yaml", ".yml")):
                continue
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc["__template__"] = template
                    docs.append(doc)
        return docs

    yield render
    chart.close()


@pytest.fixture(scope="session")
def rendered_sets(render_chart: Renderer) -> dict[str, list[dict[str, Any]]]:
    """Every value set of VALUE_SETS rendered once."""
    return {
        name: render_chart(deep_merge(REQUIRED_VALUES, values))
        for name, values in VALUE_SETS.items()
    }


# ------------------------------------------------------------------ compose
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``,
    ``${VAR:?err}``, ``${VAR?err}``, ``$VAR``) applied to every string of ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        unset_or_empty = current is None or current == ""
        if op in (":-", ":?") and unset_or_empty or op in ("-", "?") and current is None:
            if op.endswith("?"):
                raise MissingVariable(f"{name}: {arg}")
            return arg
        return current or ""

    return _VAR.sub(substitute, value)


@pytest.fixture(scope="session")
def compose_raw() -> dict[str, Any]:
    """docker-compose.yml as YAML (anchors and merge keys resolved, variables not)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_secret_variables(raw: Mapping[str, Any]) -> set[str]:
    """Every variable the compose file marks as required with ``${VAR:?…}``."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, str):
            for match in _VAR.finditer(node):
                if match.group("op") in (":?", "?"):
                    found.add(match.group("braced"))

    walk(raw)
    return found


@pytest.fixture(scope="session")
def compose_env(compose_raw: dict[str, Any]) -> dict[str, str]:
    """A value for every required variable: random-looking, never a placeholder."""
    return {
        name: f"{name.lower().replace('_', '')[:12]}-4f3e2d1c0b"
        for name in compose_secret_variables(compose_raw)
    }


@pytest.fixture(scope="session")
def compose(compose_raw: dict[str, Any], compose_env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml with every variable interpolated."""
    return interpolate(compose_raw, compose_env)


# ------------------------------------------------------------------ a running server
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def exported_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Names of every series ``histoloop serve`` exports on /metrics (histograms with their
    _bucket/_sum/_count series), scraped from a real server process."""
    exe = Path(sys.executable).with_name("histoloop")
    if not exe.exists():
        pytest.fail(
            f"{exe} not found: install the package (pip install -e .) to get the histoloop command"
        )
    data_dir = tmp_path_factory.mktemp("serve")
    metrics_port = _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("HISTOLOOP_")},
        "HISTOLOOP_DATA_DIR": str(data_dir),
        "HISTOLOOP_GRPC_PORT": str(_free_port()),
        "HISTOLOOP_METRICS_PORT": str(metrics_port),
    }
    log = (data_dir / "serve.log").open("wb")
    proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{metrics_port}/metrics", timeout=2
                ) as reply:
                    body = reply.read().decode()
                if "histoloop_" in body:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        if body is None or "histoloop_" not in body:
            log.flush()
            pytest.fail(
                f"`histoloop serve` exported no histoloop metrics (exit {proc.poll()}):\n"
                + (data_dir / "serve.log").read_text()[-4000:]
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    names: set[str] = set()
    for line in body.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
            elif kind == "summary":
                names |= {f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names
