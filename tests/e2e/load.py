"""Concurrent annotators against the distributed stack: the load run and its checks.

``run_load`` registers one annotator (with their own bearer token and gRPC channel) per
client on a project whose dataset is embedded, then each client submits label batches
(``batch_size`` ground-truth labels of random in-tissue spots, a unique batch id) on its own
fixed schedule — one every ``interval`` seconds — for ``duration`` seconds. Latency is
measured from each call's *scheduled* time, so a slow server cannot hide queueing by slowing
the clients down. Loopback only; every loop is bounded by the duration and timeouts.

Afterwards it checks, in PostgreSQL and on the bus: every acknowledged label is stored
exactly once, resubmitted batches are recognised as duplicates, every batch produced exactly
one ``labels.committed``, retraining was coalesced (fewer models than batches, never two
for one label version) and the newest label version got its model and its query set.

Used by ``tests/e2e/test_load.py`` (small, bounded) and ``benchmarks/bench_load.py``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import grpc

from histoloop import events
from histoloop.channels import make_channel
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc as pb_grpc
from tests.e2e.loop import ProjectLoop, read_events, wait_for
from tests.e2e.stack import Stack

__all__ = ["LoadResult", "percentile", "run_load"]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))]


@dataclass
class LoadResult:
    """What one run did and what the checks found."""

    clients: int
    duration_s: float
    interval_s: float
    batch_size: int
    batches: int = 0
    labels: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    stored_labels: int = 0
    stored_batches: int = 0
    duplicate_rows: int = 0
    resubmitted: int = 0
    resubmitted_duplicate: int = 0
    label_events: int = 0
    label_event_ids: int = 0
    models: int = 0
    model_versions_distinct: bool = False
    final_label_version: int = 0
    final_model_label_version: int = 0
    final_query_round: int = 0
    pending_at_window_end: int = 0
    """Label batches still in the outbox (not yet on the bus) when the clients stopped."""
    catch_up_s: float = 0.0
    """From the end of the window to the model of the newest labels and its query set."""

    @property
    def labels_per_s(self) -> float:
        """Acknowledged labels per second of the window."""
        return self.labels / self.duration_s

    def latency(self, q: float) -> float:
        """SubmitLabels latency percentile in ms."""
        return percentile(self.latencies_ms, q) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        """Everything but the raw latencies, plus the percentiles."""
        out = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        out.update(
            labels_per_s=round(self.labels_per_s, 1),
            **{f"p{q}_ms": round(self.latency(q), 1) for q in (50, 95, 99)},
            max_ms=round(max(self.latencies_ms, default=float("nan")), 1),
        )
        return out


def run_load(
    stack: Stack,
    loop: ProjectLoop,
    *,
    clients: int,
    duration: float,
    interval: float = 0.5,
    batch_size: int = 8,
    seed: int = 0,
    catch_up_timeout: float = 180.0,
    progress: Callable[[str], None] = lambda line: None,
) -> LoadResult:
    """Run the load on ``loop``'s project (created, dataset embedded, cold start answered or not)."""
    admin = stack.store_stub()
    qs = admin.GetQuerySet(pb.GetQuerySetRequest(project_id=loop.project_id), timeout=30)
    dataset = qs.spots[0].dataset
    in_tissue = sorted(loop.truth_in_tissue)
    tokens = [
        admin.RegisterAnnotator(
            pb.RegisterAnnotatorRequest(
                annotator_id=f"{loop.project_id}-a{i:03d}",
                display_name=f"annotator {i}",
                role=pb.ANNOTATOR_ROLE_ANNOTATOR,
                projects=[loop.project_id],
            ),
            timeout=30,
        ).token
        for i in range(clients)
    ]
    result = LoadResult(
        clients=clients, duration_s=duration, interval_s=interval, batch_size=batch_size
    )
    acknowledged: list[str] = []
    sent: dict[str, list[str]] = {}  # batch id → its spots, to send the same batch again
    lock = threading.Lock()
    start = time.monotonic() + 1.0  # every client starts on the same clock

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        channel = make_channel(
            stack.services["annotation_store"].address, stack.settings, token=tokens[i]
        )
        stub = pb_grpc.AnnotationStoreServiceStub(channel)
        # a random phase spreads the clients over the interval, as independent people would be
        scheduled = start + rng.random() * interval
        n = 0
        try:
            while scheduled < start + duration:
                delay = scheduled - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                spots = rng.sample(in_tissue, batch_size)
                batch_id = f"load-c{i:03d}-b{n:05d}"
                request = pb.SubmitLabelsRequest(
                    project_id=loop.project_id,
                    dataset_id=dataset,
                    batch_id=batch_id,
                    labels=[pb.SpotLabel(barcode=b, label=loop.truth[b]) for b in spots],
                )
                try:
                    reply = stub.SubmitLabels(request, timeout=30)
                except grpc.RpcError:
                    with lock:
                        result.errors += 1
                else:
                    latency = (time.monotonic() - scheduled) * 1000
                    with lock:
                        result.latencies_ms.append(latency)
                        result.batches += 1
                        result.labels += reply.n_labels
                        acknowledged.append(batch_id)
                        sent[batch_id] = spots
                n += 1
                scheduled += interval
        finally:
            channel.close()

    threads = [
        threading.Thread(target=client, args=(i,), name=f"annotator-{i}") for i in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration + 120)
    window_end = time.monotonic()
    result.pending_at_window_end = int(
        admin.GetStatus(pb.GetStatusRequest(project_id=loop.project_id), timeout=30).pending_events
    )
    progress(
        f"window over: {result.batches} batches acknowledged, {result.errors} errors, "
        f"{result.pending_at_window_end} still in the outbox"
    )

    # exactly once, in the database
    project = loop.project_id
    mine = (
        "FROM label_events e JOIN label_batches b ON b.id = e.batch_pk "
        "WHERE e.project_id = %s AND b.batch_id LIKE 'load-c%%'"
    )
    result.stored_labels = int(stack.sql(f"SELECT count(*) {mine}", project)[0][0])
    result.stored_batches = int(
        stack.sql(
            "SELECT count(*) FROM label_batches WHERE project_id = %s AND batch_id LIKE 'load-c%%'",
            project,
        )[0][0]
    )
    result.duplicate_rows = int(
        stack.sql(
            f"SELECT count(*) FROM (SELECT e.batch_pk, e.spot_id {mine} "
            "GROUP BY e.batch_pk, e.spot_id HAVING count(*) > 1) d",
            project,
        )[0][0]
    )
    # the same batches again (a client's retry) are recognised, not stored twice
    sample = random.Random(seed).sample(acknowledged, min(20, len(acknowledged)))
    for batch_id in sample:
        owner = int(batch_id.split("-")[1][1:])
        stub = pb_grpc.AnnotationStoreServiceStub(stack.channel("annotation_store", tokens[owner]))
        reply = stub.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=project,
                dataset_id=dataset,
                batch_id=batch_id,
                labels=[pb.SpotLabel(barcode=b, label=loop.truth[b]) for b in sent[batch_id]],
            ),
            timeout=30,
        )
        result.resubmitted += 1
        result.resubmitted_duplicate += int(reply.duplicate)

    # the loop catches up: the newest labels get their model and their query set
    status = admin.GetStatus(pb.GetStatusRequest(project_id=project), timeout=30)
    result.final_label_version = int(status.label_version)

    def caught_up() -> bool:
        s = admin.GetStatus(pb.GetStatusRequest(project_id=project), timeout=30)
        models = loop.models()
        progress(
            f"  +{time.monotonic() - window_end:.0f}s: outbox {s.pending_events}, models {len(models)}, "
            f"newest model on labels v{models[-1].label_version if models else 0} "
            f"of v{result.final_label_version}"
        )
        if s.pending_events or not models or models[-1].label_version != result.final_label_version:
            return False
        latest = admin.GetQuerySet(pb.GetQuerySetRequest(project_id=project), timeout=30)
        return latest.model_version == models[-1].model_version

    wait_for("the newest labels' model and query set", caught_up, catch_up_timeout, interval=2.0)
    result.catch_up_s = time.monotonic() - window_end
    models = loop.models()
    result.models = len(models)
    versions = [m.label_version for m in models]
    result.model_versions_distinct = len(set(versions)) == len(versions) and versions == sorted(
        versions
    )
    result.final_model_label_version = int(versions[-1])
    result.final_query_round = int(
        admin.GetQuerySet(pb.GetQuerySetRequest(project_id=project), timeout=30).round
    )
    committed = read_events(stack, (events.LABELS_COMMITTED,), project=project, timeout=60)
    load_events = [e for e in committed if e.message.batch_id.startswith("load-c")]
    result.label_events = len(load_events)
    result.label_event_ids = len({e.event_id for e in load_events})
    return result
