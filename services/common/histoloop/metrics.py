"""Prometheus metrics every service exports on ``/metrics``.

Metric objects are module-level singletons in the default registry so that any module
can record into them; names are the contract the Grafana dashboard and alert rules use
(``deploy/monitoring``), checked by a test that scrapes a running server.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "ARTIFACT_BYTES",
    "EMBEDDED_PATCHES",
    "LABELS_COMMITTED",
    "LOOP_LATENCY",
    "MODEL_METRIC",
    "QUERYSETS",
    "ROUND",
    "TRAINING_RUNS",
    "TRITON_ERRORS",
    "TRITON_LATENCY",
    "CONSUMER_LAG",
    "DEAD_LETTERS",
    "OLDEST_UNHANDLED",
    "STAGE_FAILURES",
    "EVENTS_CONSUMED",
    "EVENTS_FAILED",
    "EVENTS_PRODUCED",
    "RPC_LATENCY",
    "RPC_REQUESTS",
]

RPC_REQUESTS = Counter(
    "histoloop_rpc_requests_total",
    "gRPC requests handled, by service, method and status code.",
    ["service", "method", "code"],
)
RPC_LATENCY = Histogram(
    "histoloop_rpc_latency_seconds",
    "gRPC request latency, by service and method.",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
EVENTS_PRODUCED = Counter(
    "histoloop_events_produced_total", "Events published to the bus, by topic.", ["topic"]
)
EVENTS_CONSUMED = Counter(
    "histoloop_events_consumed_total",
    "Events handled successfully, by topic and consumer group.",
    ["topic", "group"],
)
EVENTS_FAILED = Counter(
    "histoloop_events_failed_total",
    "Event handling attempts that raised, by topic and consumer group.",
    ["topic", "group"],
)
CONSUMER_LAG = Gauge(
    "histoloop_consumer_lag",
    "Events on the bus not yet handled by the consumer group, by topic.",
    ["topic", "group"],
)
DEAD_LETTERS = Counter(
    "histoloop_dead_letters_total",
    "Events parked as dead letters (retries ran out or bad data), by stage; see GetStatus.",
    ["stage"],
)
STAGE_FAILURES = Counter(
    "histoloop_stage_failures_total",
    "Failed attempts at an event that were not a dependency outage, by stage.",
    ["stage"],
)
OLDEST_UNHANDLED = Gauge(
    "histoloop_oldest_unhandled_event_age_seconds",
    "Age of the oldest event a stage has taken but not finished (in hand or awaiting a retry).",
    ["stage"],
)
ARTIFACT_BYTES = Counter(
    "histoloop_artifact_bytes_total",
    "Bytes moved to (out) and from (in) the artifact store.",
    ["direction"],
)

# the loop ---------------------------------------------------------------------------
LABELS_COMMITTED = Counter(
    "histoloop_labels_committed_total", "Labels committed to the annotation store.", ["project"]
)
QUERYSETS = Counter("histoloop_querysets_total", "Query sets produced.", ["project", "strategy"])
ROUND = Gauge("histoloop_round", "Current active-learning round of a project.", ["project"])
LOOP_LATENCY = Histogram(
    "histoloop_loop_latency_seconds",
    "Time from labels committed to the next query set ready.",
    ["project"],
    buckets=(0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600),
)
TRAINING_RUNS = Counter(
    "histoloop_training_runs_total", "Training runs, by outcome (success, failure).", ["outcome"]
)
MODEL_METRIC = Gauge(
    "histoloop_model_metric",
    "Validation metric of a project's latest model (metric: macro_f1, balanced_accuracy, kappa).",
    ["project", "metric"],
)
EMBEDDED_PATCHES = Counter(
    "histoloop_embedded_patches_total", "Patches turned into vectors, by embedder.", ["embedder"]
)
TRITON_LATENCY = Histogram(
    "histoloop_triton_request_seconds", "Latency of one Triton inference request.", ["model"]
)
TRITON_ERRORS = Counter(
    "histoloop_triton_errors_total",
    "Triton requests that failed (after retries: final).",
    ["model"],
)
