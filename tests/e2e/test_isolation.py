"""Failure isolation on the distributed stack: six processes, Kafka, S3, PostgreSQL, Triton.

A project whose slide cannot be read, and events of another project that point at nothing
in every stage, are parked by the stages that fail on them — each a separate process
writing its stage state to S3 — and the annotation store shows them in ``GetStatus``,
while a healthy project runs its rounds as usual and every consumer group catches up.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from histoloop import events
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import common_pb2, events_pb2
from tests.e2e.loop import BusEvent, ProjectLoop, republish, wait_caught_up, wait_for
from tests.e2e.stack import Stack

LOOP_STAGES = ("tiling", "embedding", "training", "prediction", "acquisition")


def _parked(stack: Stack, project: str) -> dict[str, str]:
    status = stack.store_stub().GetStatus(pb.GetStatusRequest(project_id=project), timeout=30)
    return {p.stage: p.error for p in status.parked}


def test_parked_per_project_and_stage_across_processes(
    stack: Stack, visium: Path, slide: Path, tmp_path: Path
) -> None:
    healthy = ProjectLoop(stack, visium, slide)
    unreadable = tmp_path / f"scan-{uuid.uuid4().hex[:6]}.svs"
    unreadable.write_bytes(b"II*\x00 not really a TIFF " * 200)
    broken = ProjectLoop(stack, visium, unreadable)
    ghost = ProjectLoop(stack, visium, slide)
    try:
        healthy.create()
        healthy.watch()
        broken.create()
        broken.register()  # passes the door (the size cannot be read), fails in tiling
        ghost.create()
        nowhere = stack.artifacts().uri("nothing/here.bin")
        meta = {"project": ghost.project_id, "dataset": "cmu", "producer": "e2e"}
        messages = [
            events_pb2.DatasetRegistered(
                meta=events.new_meta(**meta), slide_uri=nowhere, kind=common_pb2.DATASET_KIND_WSI
            ),
            events_pb2.TilesReady(meta=events.new_meta(**meta), patches_uri=nowhere),
            events_pb2.LabelsCommitted(
                meta=events.new_meta(**meta),
                labels_uri=nowhere,
                embeddings_uris=[nowhere],
                label_version=1,
            ),
            events_pb2.ModelTrained(meta=events.new_meta(**meta), model_uri=nowhere),
            events_pb2.PredictionsReady(meta=events.new_meta(**meta), predictions_uri=nowhere),
        ]
        republish(
            stack,
            [
                BusEvent(
                    events.topic_of(m),
                    ghost.project_id,
                    m.meta.event_id,
                    0,
                    0,
                    m,
                    m.SerializeToString(),
                )
                for m in messages
            ],
        )

        healthy.register()
        query_set = healthy.next_query_set(-1, timeout=300)
        healthy.answer(query_set)
        assert healthy.next_query_set(0, timeout=300).round == 1

        errors = wait_for(
            "the broken slide parked in tiling", lambda: _parked(stack, broken.project_id), 120
        )
        assert unreadable.name in errors["tiling"] and "histoloop-tiling-" not in errors["tiling"]
        wait_for(
            "the ghost events parked in every stage",
            lambda: set(LOOP_STAGES) <= set(_parked(stack, ghost.project_id)),
            120,
        )
        status = stack.store_stub().GetStatus(
            pb.GetStatusRequest(project_id=healthy.project_id), timeout=30
        )
        done = {s.stage for s in status.stages if s.status == common_pb2.STAGE_STATUS_DONE}
        assert set(LOOP_STAGES) <= done and status.n_parked == 0
        wait_caught_up(stack)
    finally:
        for loop in (healthy, broken, ghost):
            loop.close()
