"""Prometheus config, alert rules and the Grafana dashboard: they parse, their PromQL parses,
and every metric they query exists — histoloop's own metrics are checked against the
/metrics of a running ``histoloop serve``; Triton's against the list below."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import MONITORING, REPO

promql_parser = pytest.importorskip("promql_parser", reason="promql-parser parses PromQL")

ALERTS = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "histoloop.json"
RUNBOOK = REPO / "deploy" / "RUNBOOK.md"

# Metrics of NVIDIA Triton's metrics endpoint (port 8002), as documented in
# https://github.com/triton-inference-server/server/blob/main/docs/user_guide/metrics.md
# (inference request, latency, GPU and CPU metrics of the 24.08 release).
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_pending_request_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_total_bytes",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_power_usage",
        "nv_gpu_power_limit",
        "nv_energy_consumption",
        "nv_cpu_utilization",
        "nv_cpu_memory_total_bytes",
        "nv_cpu_memory_used_bytes",
    }
)
# Series Prometheus makes itself for every target.
PROMETHEUS_METRICS = frozenset(
    {"up", "scrape_duration_seconds", "scrape_samples_scraped", "ALERTS"}
)


def metric_names(expr: str) -> set[str]:
    """Every metric name a PromQL expression selects (raises if it does not parse)."""
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def grafana_expr(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced by what they expand to."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "5m", expr)
    return re.sub(r"\$\{?[A-Za-z_]\w*\}?", ".*", expr)


def _rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def _dashboard_targets() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


# ------------------------------------------------------------------ alert rules
def test_alert_rules_parse_and_are_complete() -> None:
    rules = _rules()
    names = {rule["alert"] for rule in rules}
    assert {
        "HistoloopServiceDown",
        "HistoloopServiceMissing",
        "TritonDown",
        "HistoloopConsumerLagGrowing",
        "HistoloopTritonErrors",
        "TritonInferenceFailureRatio",
        "HistoloopTrainingFailures",
        "HistoloopNoQuerySetAfterLabels",
    } <= names
    assert len(names) == len(rules), "alert names are unique"
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert metric_names(rule["expr"]), rule["alert"]


def test_no_query_set_alert_compares_labels_with_query_sets() -> None:
    rule = next(r for r in _rules() if r["alert"] == "HistoloopNoQuerySetAfterLabels")
    assert metric_names(rule["expr"]) == {
        "histoloop_labels_committed_total",
        "histoloop_querysets_total",
    }
    assert "by (project)" in rule["expr"]


def test_runbook_links_of_the_alerts_resolve() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in _rules():
        link = rule["annotations"].get("runbook")
        if link:
            path, _, anchor = link.partition("#")
            assert (REPO / path).is_file(), link
            assert anchor in headings, f"{rule['alert']}: no heading for #{anchor} in {path}"


# ------------------------------------------------------------------ dashboard
def test_dashboard_parses_and_shows_the_loop() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "histoloop-overview"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in (
        "Loop latency",
        "Labels per hour",
        "Query sets per round",
        "Model metrics per round",
        "Triton throughput",
        "Triton queue",
        "Consumer lag",
    ):
        assert any(title.startswith(wanted) for title in titles), wanted
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel[
                "title"
            ]
            assert panel["targets"], panel["title"]
    for title, expr in _dashboard_targets():
        assert metric_names(grafana_expr(expr)), f"{title}: {expr}"


def test_dashboard_datasource_is_provisioned() -> None:
    datasources = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    source = datasources["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = json.loads(DASHBOARD.read_text())
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == source["uid"]


# ------------------------------------------------------------------ metric names exist
def _queried_metrics() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for rule in _rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for title, expr in _dashboard_targets():
        for name in metric_names(grafana_expr(expr)):
            used.setdefault(name, set()).add(f"panel {title}")
    return used


def test_every_queried_metric_is_exported(exported_metrics: set[str]) -> None:
    unknown = {}
    for name, where in _queried_metrics().items():
        if name.startswith("histoloop_"):
            if name not in exported_metrics:
                unknown[name] = where
        elif name.startswith("nv_"):
            if name not in TRITON_METRICS:
                unknown[name] = where
        elif name not in PROMETHEUS_METRICS:
            unknown[name] = where
    assert not unknown, f"queried but not exported: {unknown}"


def test_the_dashboard_covers_histoloops_metrics(exported_metrics: set[str]) -> None:
    queried = set(_queried_metrics())
    for name in (
        "histoloop_loop_latency_seconds_bucket",
        "histoloop_labels_committed_total",
        "histoloop_querysets_total",
        "histoloop_model_metric",
        "histoloop_round",
        "histoloop_consumer_lag",
        "histoloop_triton_request_seconds_bucket",
    ):
        assert name in exported_metrics and name in queried, name


# ------------------------------------------------------------------ promtool
def _promtool() -> str:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return promtool


def test_promtool_checks_the_rules() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_the_config(tmp_path: Path) -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]  # where compose mounts it
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [_promtool(), "check", "config", "--syntax-only", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alerts() -> None:
    tests = Path(__file__).with_name("promtool") / "alerts_test.yml"
    done = subprocess.run(
        [_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
