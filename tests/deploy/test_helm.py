"""The Helm chart: renders with several value sets (Helm's own engine, no binary), every
manifest validates against the Kubernetes schemas (kubernetes-validate, offline), and
`helm lint`-level rules hold: required values, names, labels, probes, resources, security."""

from __future__ import annotations

import base64
import json
import os
import re
from collections import Counter
from typing import Any

import pytest
import yaml

from .conftest import (
    CHART,
    MONITORING,
    REQUIRED_VALUES,
    SERVICES,
    VALUE_SETS,
    Renderer,
    deep_merge,
)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate ships the schemas"
)

# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion; gRPC probes are GA in
# 1.27) and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Custom resources of the Prometheus Operator: no schema in kubernetes-validate.
CUSTOM_RESOURCES = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "Pod"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
)
PLACEHOLDERS = ("changeme", "minioadmin", "password", "admin", "secret", "test")


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _named(docs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    found = [
        d
        for d in _kind(docs, kind)
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == component
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects of component {component}"
    return found[0]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"] if doc["kind"] == "Pod" else doc["spec"]["template"]["spec"]


def _strip(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "__template__"}


# ------------------------------------------------------------------ rendering + schemas
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_manifest_validates_against_the_kubernetes_schemas(
    value_set: str, rendered_sets: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered_sets[value_set]
    assert docs
    errors = []
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_RESOURCES:
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(_strip(doc), version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(
                    f"{doc['__template__']} {doc['kind']}/{doc['metadata']['name']} (k8s {version}): "
                    f"{'/'.join(map(str, exc.path))}: {exc.message}"
                )
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_helm_lint_passes(value_set: str, helm: Any) -> None:
    values = deep_merge(REQUIRED_VALUES, VALUE_SETS[value_set])
    report = helm.lint(str(CHART), values, strict=True, kube_version="v1.27.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert not problems and not report["errors"], json.dumps(report, indent=2)


def test_custom_resources_are_well_formed(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered_sets["servicemonitor"]
    monitors = _kind(docs, "ServiceMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        endpoint = monitor["spec"]["endpoints"][0]
        assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        jobs = [r["replacement"] for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
        assert jobs in (["histoloop"], ["triton"])
        # the selected Services exist and expose a port named metrics
        selector = monitor["spec"]["selector"]
        components = set(next((e["values"] for e in selector.get("matchExpressions", [])), [])) or {
            selector["matchLabels"]["app.kubernetes.io/component"]
        }
        for component in components:
            service = _named(docs, "Service", component)
            assert "metrics" in {p["name"] for p in service["spec"]["ports"]}
    rule = _kind(docs, "PrometheusRule")[0]
    assert (
        rule["spec"]["groups"] == yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    )
    dashboard = next(d for d in _kind(docs, "ConfigMap") if "histoloop.json" in d.get("data", {}))
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["histoloop.json"])["uid"] == "histoloop-overview"


def test_chart_copies_of_the_monitoring_files_are_identical() -> None:
    assert (CHART / "files/alerts.yml").read_bytes() == (MONITORING / "alerts.yml").read_bytes()
    assert (CHART / "files/histoloop.json").read_bytes() == (
        MONITORING / "grafana/dashboards/histoloop.json"
    ).read_bytes()


# ------------------------------------------------------------------ required values
@pytest.mark.parametrize(
    ("path", "message"),
    [
        (("config", "kafkaBootstrap"), "config.kafkaBootstrap is required"),
        (("config", "minioEndpoint"), "config.minioEndpoint is required"),
        (("secrets", "minioAccessKey"), "secrets.minioAccessKey is required"),
        (("secrets", "minioSecretKey"), "secrets.minioSecretKey is required"),
        (("secrets", "serviceToken"), "secrets.serviceToken is required"),
        (("secrets", "databaseUrl"), "secrets.databaseUrl is required"),
    ],
)
def test_required_values_are_enforced(
    path: tuple[str, str], message: str, render_chart: Renderer, helm: Any
) -> None:
    values = deep_merge(REQUIRED_VALUES, {path[0]: {path[1]: ""}})
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render_chart(values)


def test_defaults_alone_do_not_render(render_chart: Renderer, helm: Any) -> None:
    with pytest.raises(helm.HelmError, match="is required"):
        render_chart({})


@pytest.mark.parametrize("placeholder", PLACEHOLDERS)
def test_placeholder_secrets_are_refused(
    placeholder: str, render_chart: Renderer, helm: Any
) -> None:
    with pytest.raises(helm.HelmError, match="placeholder"):
        render_chart(
            deep_merge(REQUIRED_VALUES, {"secrets": {"minioSecretKey": placeholder.upper()}})
        )


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"bundled": {"postgresql": {"enabled": True}}, "secrets": {"databaseUrl": ""}},
            "bundled.postgresql.password is required",
        ),
        ({"bundled": {"minio": {"enabled": True}}}, "bundled.minio.rootUser is required"),
        ({"triton": {"enabled": False}}, "config.tritonUrl is required"),
        ({"triton": {"modelRepository": {"source": "pvc"}}}, "existingClaim is required"),
    ],
)
def test_conditional_values_are_enforced(
    values: dict[str, Any], message: str, render_chart: Renderer, helm: Any
) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        render_chart(deep_merge(REQUIRED_VALUES, values))


def test_external_triton_or_in_process_embedder(render_chart: Renderer) -> None:
    docs = render_chart(
        deep_merge(
            REQUIRED_VALUES,
            {"triton": {"enabled": False}, "config": {"tritonUrl": "triton.gpu-pool:8001"}},
        )
    )
    assert not [
        d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "triton"
    ]
    config = _kind(docs, "ConfigMap")[0]["data"]
    assert config["HISTOLOOP_TRITON_URL"] == "triton.gpu-pool:8001"
    docs = render_chart(
        deep_merge(
            REQUIRED_VALUES,
            {"triton": {"enabled": False}, "embedding": {"env": {"HISTOLOOP_EMBEDDER": "onnx"}}},
        )
    )
    assert "HISTOLOOP_TRITON_URL" not in _kind(docs, "ConfigMap")[0]["data"]


# ------------------------------------------------------------------ names and labels
@pytest.mark.parametrize(
    "release", ["rel", "a-very-long-release-name-for-the-core-facility-cluster-x"]
)
def test_names_fit_63_characters_and_are_unique(release: str, render_chart: Renderer) -> None:
    docs = render_chart(deep_merge(REQUIRED_VALUES, VALUE_SETS["bundled"]), release=release[:53])
    keys = Counter((d["kind"], d["metadata"]["name"]) for d in docs)
    assert all(n == 1 for n in keys.values()), [k for k, n in keys.items() if n > 1]
    for kind, name in keys:
        assert len(name) <= 63 and DNS_LABEL.match(name), f"{kind} name {name!r}"
    for doc in docs:
        for key, value in doc["metadata"]["labels"].items():
            assert len(value) <= 63, f"label {key}={value!r}"


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_labels_are_consistent(
    value_set: str, rendered_sets: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered_sets[value_set]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        required = (
            STANDARD_LABELS
            if doc["kind"] not in ("ConfigMap", "Secret", "ServiceMonitor", "PrometheusRule")
            else STANDARD_LABELS[:-1]
        )
        if doc["kind"] in ("Secret",) and "component" in doc["metadata"]["name"]:
            required = STANDARD_LABELS
        missing = [label for label in required if label not in labels]
        assert not missing, f"{doc['kind']}/{doc['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/part-of"] == "histoloop"
    pods = {}
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            template_labels = doc["spec"]["template"]["metadata"]["labels"]
            assert selector.items() <= template_labels.items(), doc["metadata"]["name"]
            assert selector.keys() == {
                "app.kubernetes.io/name",
                "app.kubernetes.io/instance",
                "app.kubernetes.io/component",
            }
            pods[doc["metadata"]["name"]] = template_labels
    # every Service selects exactly one workload's pods
    for service in _kind(docs, "Service"):
        selector = service["spec"]["selector"]
        matches = [name for name, labels in pods.items() if selector.items() <= labels.items()]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {matches}"
    # PodDisruptionBudgets and HPAs point at workloads that exist
    for pdb in _kind(docs, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert [n for n, labels in pods.items() if selector.items() <= labels.items()]
    for hpa in _kind(docs, "HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in pods


# ------------------------------------------------------------------ workloads
@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_workload_has_resources_and_a_hardened_security_context(
    value_set: str, rendered_sets: dict[str, list[dict[str, Any]]]
) -> None:
    for doc in rendered_sets[value_set]:
        if doc["kind"] not in WORKLOADS:
            continue
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        spec = _pod_spec(doc)
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["runAsUser"] != 0, where
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        for container in spec.get("initContainers", []) + spec["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, where
            assert security["capabilities"]["drop"] == ["ALL"], where
            assert security["runAsNonRoot"] is True, where
            assert security["seccompProfile"]["type"] == "RuntimeDefault", where
            if container["name"] != "kafka":  # the bundled trial broker writes its config at start
                assert security["readOnlyRootFilesystem"] is True, where
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], where
            assert resources["limits"]["memory"], where
            image = container["image"]
            assert ":" in image.rsplit("/", 1)[-1] or "@sha256:" in image, f"{where}: {image}"
            assert not image.endswith(":latest"), where


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_every_deployment_has_probes(
    value_set: str, rendered_sets: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered_sets[value_set]
    for doc in _kind(docs, "Deployment") + _kind(docs, "StatefulSet"):
        for container in _pod_spec(doc)["containers"]:
            assert container.get("readinessProbe") and container.get("livenessProbe"), doc[
                "metadata"
            ]["name"]
    for component, (_, grpc_service) in SERVICES.items():
        container = _pod_spec(_named(docs, "Deployment", component))["containers"][0]
        assert container["args"] == ["run", component]
        assert container["readinessProbe"]["grpc"] == {"port": 50051, "service": grpc_service}
        assert container["livenessProbe"]["grpc"] == {"port": 50051}  # the whole server
        assert container["startupProbe"]["grpc"]["port"] == 50051


@pytest.mark.parametrize("value_set", list(VALUE_SETS))
def test_services_get_their_settings(
    value_set: str, rendered_sets: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env a pod would see (ConfigMap + Secret + its own env) is enough for histoloop's
    own start-up validation, and names only real settings."""
    from histoloop.config import Settings, load_settings

    docs = rendered_sets[value_set]
    fields = {f"HISTOLOOP_{name.upper()}" for name in Settings.model_fields}
    config = _kind(docs, "ConfigMap")[0]["data"]
    secrets = {
        d["metadata"]["name"]: {
            k: base64.b64decode(v).decode() for k, v in d.get("data", {}).items()
        }
        for d in _kind(docs, "Secret")
    }
    existing = {
        "HISTOLOOP_MINIO_ACCESS_KEY": "from-existing",
        "HISTOLOOP_MINIO_SECRET_KEY": "0a1b2c3d4e5f",
        "HISTOLOOP_SERVICE_TOKEN": "1a2b3c4d5e6f",
        "HISTOLOOP_DATABASE_URL": "postgresql+psycopg://h:p@db/h",
    }
    assert set(config) <= fields, set(config) - fields
    for component in SERVICES:
        container = _pod_spec(_named(docs, "Deployment", component))["containers"][0]
        env = dict(config)
        for item in container["env"]:
            if "value" in item:
                env[item["name"]] = item["value"]
                continue
            ref = item["valueFrom"]["secretKeyRef"]
            source = secrets.get(
                ref["name"], existing if ref["name"] == "histoloop-credentials" else {}
            )
            if ref["key"] in source:
                env[item["name"]] = source[ref["key"]]
            else:
                assert ref.get("optional"), f"{component}: {ref} missing"
        assert set(env) <= fields, set(env) - fields
        for key in [k for k in os.environ if k.startswith("HISTOLOOP_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        load_settings().validate_for_start(component.replace("-", "_"))
        assert ("HISTOLOOP_DATABASE_URL" in env) == (component == "annotation-store")


def test_triton_gets_a_gpu_shared_memory_and_gpu_nodes(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    triton = _named(rendered_sets["defaults"], "Deployment", "triton")
    spec = _pod_spec(triton)
    container = spec["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert "--model-repository=/models" in container["args"]
    assert {"--model-control-mode=explicit", "--load-model=uni"} <= set(container["args"])
    assert {p["containerPort"] for p in container["ports"]} == {8000, 8001, 8002}

    cpu = _pod_spec(_named(rendered_sets["gpu-off"], "Deployment", "triton"))
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"].get("limits", {})
    assert "nodeSelector" not in cpu and "tolerations" not in cpu
    assert "--allow-gpu-metrics=false" in cpu["containers"][0]["args"]

    pvc = _pod_spec(_named(rendered_sets["production"], "Deployment", "triton"))
    models = next(v for v in pvc["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "triton-models", "readOnly": True}
    assert pvc["containers"][0]["image"] == "nvcr.io/nvidia/tritonserver:24.08-py3"


def test_disruption_budgets_and_autoscaling_where_replicas_allow(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    defaults = rendered_sets["defaults"]
    budgets = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]
        for d in _kind(defaults, "PodDisruptionBudget")
    }
    assert budgets == {"embedding"}  # the only service with replicas > 1 by default
    assert not _kind(defaults, "HorizontalPodAutoscaler")

    production = rendered_sets["production"]
    budgets = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]
        for d in _kind(production, "PodDisruptionBudget")
    }
    assert budgets == {"annotation-store", "embedding", "triton"}  # tiling's HPA starts at 1
    scaled = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in _kind(production, "HorizontalPodAutoscaler")
    }
    assert set(scaled) == {"tiling", "embedding"}
    assert scaled["embedding"]["spec"]["maxReplicas"] == 8
    assert "replicas" not in _named(production, "Deployment", "embedding")["spec"]


def test_migrations_run_as_a_hook_before_install_and_upgrade(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    job = _kind(rendered_sets["defaults"], "Job")[0]
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    container = _pod_spec(job)["containers"][0]
    assert container["args"] == ["migrate"]
    url = next(e for e in container["env"] if e["name"] == "HISTOLOOP_DATABASE_URL")
    hook_secret = next(
        s
        for s in _kind(rendered_sets["defaults"], "Secret")
        if s["metadata"]["name"] == url["valueFrom"]["secretKeyRef"]["name"]
    )
    # the hook Secret exists before the Job (lower weight): the release's Secret does not yet
    assert int(hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        annotations["helm.sh/hook-weight"]
    )
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook"] == annotations["helm.sh/hook"]

    bundled_jobs = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in _kind(rendered_sets["bundled"], "Job")
    }
    assert (
        bundled_jobs["migrate"]["metadata"]["annotations"]["helm.sh/hook"]
        == "post-install,pre-upgrade"
    )
    assert int(bundled_jobs["minio-init"]["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0

    production = rendered_sets["production"]
    job = next(d for d in _kind(production, "Job"))
    ref = next(
        e for e in _pod_spec(job)["containers"][0]["env"] if e["name"] == "HISTOLOOP_DATABASE_URL"
    )
    assert ref["valueFrom"]["secretKeyRef"]["name"] == "histoloop-credentials"
    assert not _kind(production, "Secret")  # existingSecret: the chart creates none


def test_scrape_annotations_unless_service_monitors(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    for value_set, expected in (("defaults", True), ("servicemonitor", False)):
        for component in [*SERVICES, "triton"]:
            annotations = _named(rendered_sets[value_set], "Deployment", component)["spec"][
                "template"
            ]["metadata"].get("annotations", {})
            assert (annotations.get("prometheus.io/scrape") == "true") is expected, (
                value_set,
                component,
            )
    assert not _kind(rendered_sets["defaults"], "ServiceMonitor")


def test_bundled_dependencies_are_wired_in(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered_sets["bundled"]
    config = _kind(docs, "ConfigMap")[0]["data"]
    assert config["HISTOLOOP_KAFKA_BOOTSTRAP"] == "rel-histoloop-kafka:9092"
    assert config["HISTOLOOP_MINIO_ENDPOINT"] == "rel-histoloop-minio:9000"
    assert config["HISTOLOOP_MINIO_SECURE"] == "false"
    secret = next(
        s for s in _kind(docs, "Secret") if s["metadata"]["name"] == "rel-histoloop-secrets"
    )
    url = base64.b64decode(secret["data"]["HISTOLOOP_DATABASE_URL"]).decode()
    assert (
        url
        == "postgresql+psycopg://histoloop:7c6d5e4f3a2b1c0d@rel-histoloop-postgresql:5432/histoloop"
    )
    for component in ("kafka", "minio", "postgresql"):
        statefulset = _named(docs, "StatefulSet", component)
        assert statefulset["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"][
            "storage"
        ]
        assert _pod_spec(statefulset)["enableServiceLinks"] is False
    kafka_env = {
        e["name"]: e["value"]
        for e in _pod_spec(_named(docs, "StatefulSet", "kafka"))["containers"][0]["env"]
    }
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://rel-histoloop-kafka:9092"
    assert not [d for d in rendered_sets["defaults"] if d["kind"] == "StatefulSet"]


def test_network_policies_restrict_ingress(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    assert not _kind(rendered_sets["defaults"], "NetworkPolicy")
    policies = {
        d["metadata"]["labels"]["app.kubernetes.io/component"]: d
        for d in _kind(rendered_sets["production"], "NetworkPolicy")
    }
    assert set(policies) == {*SERVICES, "triton", "web"}
    grpc_rule = policies["annotation-store"]["spec"]["ingress"][0]
    assert {"podSelector": {"matchLabels": {"app": "viewer"}}} in grpc_rule["from"]
    triton_from = policies["triton"]["spec"]["ingress"][0]["from"]
    assert triton_from == [
        {
            "podSelector": {
                "matchLabels": {
                    "app.kubernetes.io/name": "histoloop",
                    "app.kubernetes.io/instance": "rel",
                    "app.kubernetes.io/component": "embedding",
                }
            }
        }
    ]


def test_image_digest_wins_over_tag(rendered_sets: dict[str, list[dict[str, Any]]]) -> None:
    container = _pod_spec(_named(rendered_sets["production"], "Deployment", "tiling"))[
        "containers"
    ][0]
    assert container["image"] == "ghcr.io/histoloop/histoloop@sha256:" + "0" * 64
    container = _pod_spec(_named(rendered_sets["defaults"], "Deployment", "tiling"))["containers"][
        0
    ]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert container["image"] == f"ghcr.io/histoloop/histoloop:{chart['appVersion']}"


def test_values_have_one_block_per_service() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for component, (key, _) in SERVICES.items():
        block = values[key]
        assert {"enabled", "replicas", "image", "resources", "env"} <= block.keys(), component
    assert values["triton"]["gpu"]["resourceName"] == "nvidia.com/gpu"
    for dependency in ("kafka", "minio", "postgresql"):
        assert values["bundled"][dependency]["enabled"] is False  # external by default
    # no secret has a default
    assert not any(values["secrets"][k] for k in values["secrets"])
    assert (
        not values["bundled"]["minio"]["rootPassword"]
        and not values["bundled"]["postgresql"]["password"]
    )


def test_disabled_services_render_nothing(render_chart: Renderer) -> None:
    docs = render_chart(deep_merge(REQUIRED_VALUES, {"training": {"enabled": False}}))
    assert not [
        d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "training"
    ]
    test_pod = _kind(docs, "Pod")[0]
    assert "TrainingService" not in test_pod["spec"]["containers"][0]["args"][0]
    assert "TilingService" in test_pod["spec"]["containers"][0]["args"][0]


def test_the_browser_workspace_is_deployed_with_http_probes_and_an_ingress(
    rendered_sets: dict[str, list[dict[str, Any]]],
) -> None:
    web = _named(rendered_sets["defaults"], "Deployment", "web")
    container = _pod_spec(web)["containers"][0]
    assert container["args"] == ["run", "web"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HISTOLOOP_WEB_STORE_ADDRESS"] == "rel-histoloop-annotation-store:50051"
    assert env["HISTOLOOP_WEB_TRAINING_ADDRESS"] == "rel-histoloop-training:50051"
    assert env["HISTOLOOP_WEB_PREDICTION_ADDRESS"] == "rel-histoloop-prediction:50051"
    assert not _kind(rendered_sets["defaults"], "Ingress")
    ingress = _kind(rendered_sets["production"], "Ingress")
    assert [i["spec"]["rules"][0]["host"] for i in ingress] == ["histoloop.facility.example.org"]
    assert (
        ingress[0]["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-buffering"]
        == "off"
    )
