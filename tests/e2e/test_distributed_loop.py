"""The loop across six service processes over Kafka, S3, PostgreSQL and Triton, gRPC only.

A pathologist's client creates a project, registers a Visium-like dataset (a spot grid in
Space Ranger's format on a real slide), gets the cold-start query set on
``WatchQuerySets``, and answers three rounds. After each ``SubmitLabels`` it makes no
other call: a model, predictions and the next query set must appear by themselves.
"""

from __future__ import annotations

import time
from pathlib import Path

from histoloop import events
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import embedding_pb2, prediction_pb2
from tests.e2e.loop import ProjectLoop, read_events
from tests.e2e.stack import Stack

ROUNDS = 3


def test_three_rounds_over_six_processes(stack: Stack, visium: Path, slide: Path) -> None:
    loop = ProjectLoop(stack, visium, slide, project_id="e2e-loop", query_size=8)
    started = time.monotonic()
    query_set = loop.start()
    cold_start_s = time.monotonic() - started
    try:
        assert query_set.round == 0 and query_set.strategy == "coldstart_kmeans"
        assert len(query_set.spots) == 8 and not query_set.model_version
        in_tissue = {b for b, t in zip(*_in_tissue(visium), strict=True) if t}
        assert {s.barcode for s in query_set.spots} <= in_tissue

        round_seconds = []
        for round_ in range(1, ROUNDS + 1):
            submitted = time.monotonic()
            reply = loop.answer(query_set)
            assert reply.n_labels == 8 and reply.label_version == round_ and not reply.duplicate
            query_set = loop.next_query_set(round_ - 1)  # nothing else is called in between
            round_seconds.append(time.monotonic() - submitted)
            assert query_set.round == round_ and query_set.model_version
            asked = {s.barcode for s in query_set.spots}
            assert len(asked) == 8 and not asked & loop.labelled, (
                "a query set asks only unlabelled spots"
            )

            models = loop.models()
            assert [m.label_version for m in models] == list(range(1, round_ + 1)), (
                "one model per batch"
            )
            assert models[-1].model_version == query_set.model_version
            assert models[-1].metrics.n_train + models[-1].metrics.n_val == 8 * round_

        # predictions of every spot by the latest model, over gRPC
        embedded = stack.embedding_stub().EmbedDataset(
            embedding_pb2.EmbedDatasetRequest(project_id=loop.project_id, dataset_id="cmu"),
            timeout=30,
        )
        assert embedded.n_spots == len(in_tissue)
        predicted = stack.prediction_stub().Predict(
            prediction_pb2.PredictRequest(
                project_id=loop.project_id, embeddings_uri=embedded.embeddings_uri
            ),
            timeout=60,
        )
        assert predicted.model_version == query_set.model_version
        assert set(predicted.barcodes) == in_tissue and set(predicted.predicted) <= {
            "upper",
            "middle",
            "lower",
        }
        status = loop.store.GetStatus(pb.GetStatusRequest(project_id=loop.project_id), timeout=30)
        assert status.label_version == ROUNDS and status.n_labelled == 8 * ROUNDS
        assert status.latest_model_version == query_set.model_version and status.pending_events == 0

        # on the bus: each step once per cause, nothing repeated
        counts = _event_counts(stack, loop.project_id)
        assert counts == {
            events.DATASET_REGISTERED: 1,
            events.TILES_READY: 1,
            events.EMBEDDINGS_READY: 1,
            events.LABELS_COMMITTED: ROUNDS,
            events.MODEL_TRAINED: ROUNDS,
            events.PREDICTIONS_READY: ROUNDS,
            events.QUERYSET_READY: ROUNDS + 1,
        }, counts
        assert [q.round for q in loop.query_sets()] == list(range(ROUNDS + 1))
        print(
            f"cold start {cold_start_s:.1f}s; labels → next query set: "
            + ", ".join(f"{s:.1f}s" for s in round_seconds)
        )
    finally:
        loop.close()


def _in_tissue(visium: Path) -> tuple[list[str], list[int]]:
    import pandas as pd

    positions = pd.read_csv(visium / "tissue_positions.csv")
    return [str(b) for b in positions.barcode], [int(t) for t in positions.in_tissue]


def _event_counts(stack: Stack, project: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in read_events(stack, project=project):
        counts[event.topic] = counts.get(event.topic, 0) + 1
    return counts
