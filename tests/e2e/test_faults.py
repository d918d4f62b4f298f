"""Faults a core facility sees, each on the running distributed stack; each ends with nothing
lost and the loop still working (the next query set appears without any extra call).

Every test uses its own project, so what it counts (models, query sets, events) is its own.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from histoloop import events
from histoloop.v1 import annotation_store_pb2 as pb
from tests.e2e.loop import (
    ProjectLoop,
    artifact_uris,
    read_events,
    republish,
    wait_caught_up,
    wait_for,
)
from tests.e2e.stack import Stack

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _count(stack: Stack, project: str, topic: str) -> int:
    return len(read_events(stack, (topic,), project=project))


def _distinct(stack: Stack, project: str, topic: str) -> int:
    return len({e.event_id for e in read_events(stack, (topic,), project=project)})


def _keys(stack: Stack, prefix: str) -> list[str]:
    return [info.key for info in stack.artifacts().list(prefix)]


# (a) --------------------------------------------------------------------------------------------
def test_training_killed_mid_run_is_redone_once(stack: Stack, visium: Path, slide: Path) -> None:
    """kill -9 the training process while it handles labels.committed; restart it."""
    loop = ProjectLoop(stack, visium, slide, head="mlp")  # an MLP takes ~1 s: a window to kill in
    query_set = loop.start()
    store = stack.artifacts()
    training = stack.services["training"]
    try:
        loop.answer(query_set)
        # the handler's first write: the event it is handling, kept for the Train RPC
        wait_for(
            "training to start on the labels",
            lambda: any(True for _ in store.list(f"training/{loop.project_id}/")),
            30,
            interval=0.01,
        )
        assert training.kill() == -signal.SIGKILL
        assert _count(stack, loop.project_id, events.MODEL_TRAINED) == 0, "killed after it finished"

        stack.restart("training")
        query_set = loop.next_query_set(0, timeout=120)
        assert query_set.round == 1
        models = loop.models()
        assert [m.label_version for m in models] == [1], models
        assert _count(stack, loop.project_id, events.MODEL_TRAINED) == 1
        assert len(_keys(stack, f"models/{loop.project_id}/")) == len(
            _keys(stack, f"models/{loop.project_id}/{models[0].model_version}/")
        ), "one model version only"
        # and the loop goes on
        loop.answer(query_set)
        assert loop.next_query_set(1).round == 2
        assert [m.label_version for m in loop.models()] == [1, 2]
    finally:
        loop.close()
        if not training.running:
            stack.restart("training")


# (b) --------------------------------------------------------------------------------------------
def test_broker_paused_during_label_submission(stack: Stack, visium: Path, slide: Path) -> None:
    """The broker stops answering for 20 s around SubmitLabels: the outbox keeps the event."""
    loop = ProjectLoop(stack, visium, slide)
    query_set = loop.start()
    try:
        stack.kafka.pause()
        paused = time.monotonic()
        try:
            started = time.monotonic()
            reply = loop.answer(query_set, timeout=30)
            submit_s = time.monotonic() - started
            assert reply.label_version == 1 and not reply.duplicate
            assert submit_s < 5.0, f"SubmitLabels waited on the broker ({submit_s:.1f}s)"
            status = loop.store.GetStatus(
                pb.GetStatusRequest(project_id=loop.project_id), timeout=10
            )
            assert status.pending_events == 1, "the event waits in the outbox"
            time.sleep(max(0.0, 20.0 - (time.monotonic() - paused)))
        finally:
            stack.kafka.resume()
        query_set = loop.next_query_set(0, timeout=150)
        assert query_set.round == 1
        assert [m.label_version for m in loop.models()] == [1]
        # at least once on the bus (a producer retry across the outage may write a second copy
        # of the record, with the same event id), handled once
        assert _distinct(stack, loop.project_id, events.LABELS_COMMITTED) == 1
        # consumers resumed from their committed offsets: nothing handled twice, nothing skipped
        wait_caught_up(stack, timeout=90)
        assert _distinct(stack, loop.project_id, events.MODEL_TRAINED) == 1
        assert _distinct(stack, loop.project_id, events.QUERYSET_READY) == 2
        assert [q.round for q in loop.query_sets()] == [0, 1]
        stack.wait_ready(timeout=60)
        loop.answer(query_set)
        assert loop.next_query_set(1).round == 2
    finally:
        loop.close()


# (c) --------------------------------------------------------------------------------------------
def test_triton_unavailable_during_embedding(stack: Stack, visium: Path, slide: Path) -> None:
    """Triton cut off: the embedding retries, reports NOT_SERVING, announces nothing; then completes."""
    loop = ProjectLoop(stack, visium, slide)
    stack.triton_proxy.disable()
    try:
        loop.create()
        loop.watch()
        loop.register()
        wait_for("tiles.ready", lambda: _count(stack, loop.project_id, events.TILES_READY), 60)
        wait_for(
            "the embedding service to report NOT_SERVING",
            lambda: stack.health("embedding", timeout=15) == NOT_SERVING,
            60,
        )
        down_since = time.monotonic()
        time.sleep(max(0.0, 15.0 - (time.monotonic() - down_since)))
        assert _count(stack, loop.project_id, events.EMBEDDINGS_READY) == 0
        assert _keys(stack, f"embeddings/{loop.project_id}/") == [], "no partial artifact"
        assert stack.triton_proxy.refused > 0, "the embedding service kept trying"
    finally:
        stack.triton_proxy.enable()
    try:
        query_set = loop.next_query_set(-1, timeout=120)
        assert query_set.round == 0
        wait_for(
            "the embedding service to report SERVING",
            lambda: stack.health("embedding", timeout=15) == SERVING,
            60,
        )
        assert _count(stack, loop.project_id, events.EMBEDDINGS_READY) == 1
        assert len(_keys(stack, f"embeddings/{loop.project_id}/")) == 1
        log = stack.services["embedding"].log_text()
        assert "unavailable" in log.lower() and "retrying" in log
        loop.answer(query_set)
        assert loop.next_query_set(0).round == 1
    finally:
        loop.close()


# (d) --------------------------------------------------------------------------------------------
def test_duplicate_and_out_of_order_events(stack: Stack, visium: Path, slide: Path) -> None:
    """Every event of two rounds delivered again, newest first, and old duplicates behind new
    labels in one poll: no duplicate model, no duplicate query set, the new labels trained."""
    loop = ProjectLoop(stack, visium, slide)
    query_set = loop.start()
    try:
        for round_ in (1, 2):
            loop.answer(query_set)
            query_set = loop.next_query_set(round_ - 1)
        wait_caught_up(stack)
        before = read_events(stack, project=loop.project_id)
        counts = {t: sum(e.topic == t for e in before) for t in events.TOPICS}
        assert counts[events.MODEL_TRAINED] == 2 and counts[events.QUERYSET_READY] == 3

        # 1. everything again, newest first, each twice
        duplicates = [e for e in reversed(before) for _ in range(2)]
        republish(stack, duplicates)
        wait_caught_up(stack)
        after = read_events(stack, project=loop.project_id)
        assert len(after) == len(before) + len(duplicates), "a service acted on a duplicate"
        assert [m.label_version for m in loop.models()] == [1, 2]
        assert [q.round for q in loop.query_sets()] == [0, 1, 2]
        assert len(_keys(stack, f"querysets/{loop.project_id}/")) == 3

        # 2. new labels, a copy of them and old duplicates behind them, all ready when the
        #    training service comes back (stopped meanwhile): one coalesced batch
        labels = [e for e in before if e.topic == events.LABELS_COMMITTED]
        training = stack.services["training"]
        assert training.terminate() == 0
        try:
            loop.answer(query_set)
            on_bus = counts[events.LABELS_COMMITTED] * 3 + 1  # originals, two copies each, v3
            wait_for(
                "labels v3 on the bus",
                lambda: _count(stack, loop.project_id, events.LABELS_COMMITTED) == on_bus,
                30,
            )
            v3 = [
                e
                for e in read_events(stack, (events.LABELS_COMMITTED,), project=loop.project_id)
                if e.message.label_version == 3
            ]
            # a copy of v3 (as a producer retry makes), then v2 and v1 again: out of order
            republish(stack, [v3[0], labels[1], labels[0]])
        finally:
            stack.restart("training")
        query_set = loop.next_query_set(2, timeout=120)
        assert query_set.round == 3
        assert [m.label_version for m in loop.models()] == [1, 2, 3], (
            "the new labels were trained once"
        )
        wait_caught_up(stack)
        assert [q.round for q in loop.query_sets()] == [0, 1, 2, 3]
    finally:
        loop.close()


# (e) --------------------------------------------------------------------------------------------
def test_artifact_store_unreachable_during_prediction(
    stack: Stack, visium: Path, slide: Path
) -> None:
    """The prediction service loses S3 while a model.trained waits for it: retried, not dropped."""
    loop = ProjectLoop(stack, visium, slide)
    query_set = loop.start()
    proxy = stack.s3_proxies["prediction"]
    try:
        proxy.disable()
        try:
            loop.answer(query_set)
            wait_for(
                "model.trained", lambda: _count(stack, loop.project_id, events.MODEL_TRAINED), 60
            )
            wait_for(
                "the prediction service to report NOT_SERVING",
                lambda: stack.health("prediction") == NOT_SERVING,
                30,
            )
            time.sleep(10)
            assert _count(stack, loop.project_id, events.PREDICTIONS_READY) == 0
            assert proxy.refused > 0
        finally:
            proxy.enable()
        query_set = loop.next_query_set(0, timeout=120)
        assert query_set.round == 1
        assert _count(stack, loop.project_id, events.PREDICTIONS_READY) == 1
        wait_for(
            "the prediction service to report SERVING",
            lambda: stack.health("prediction") == SERVING,
            30,
        )
        loop.answer(query_set)
        assert loop.next_query_set(1).round == 2
    finally:
        loop.close()


# (f) --------------------------------------------------------------------------------------------
def test_sigterm_to_every_service_mid_work(stack: Stack, visium: Path, slide: Path) -> None:
    """SIGTERM to all six while labels are being trained on and a dataset is being tiled."""
    busy = ProjectLoop(stack, visium, slide, head="mlp")
    fresh = ProjectLoop(stack, visium, slide)
    query_set = busy.start()
    try:
        fresh.create()
        busy.answer(query_set)
        fresh.register()
        time.sleep(0.5)
        codes: dict[str, int] = {}

        def stop(name: str) -> None:
            codes[name] = stack.services[name].terminate(timeout=40)

        threads = [threading.Thread(target=stop, args=(n,)) for n in stack.services]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == dict.fromkeys(stack.services, 0), codes

        # no event on the bus refers to an artifact that is not there
        store = stack.artifacts()
        missing = []
        for event in read_events(stack):
            for field, uri in artifact_uris(event.message):
                key = store.key_from_uri(uri)
                ok = (
                    any(True for _ in store.list(key.rstrip("/") + "/"))
                    if field.endswith("prefix")
                    else store.exists(key)
                )
                if not ok:
                    missing.append((event.topic, event.event_id, field, uri))
        assert not missing, missing

        for name in stack.services:
            stack.services[name].start()
        stack.wait_ready(timeout=120)
        busy.close()
        fresh.close()
        busy.watch()
        fresh.watch()
        assert busy.next_query_set(0, timeout=150).round == 1
        assert fresh.next_query_set(-1, timeout=150).round == 0
        assert [m.label_version for m in busy.models()] == [1]
    finally:
        busy.close()
        fresh.close()
        for proc in stack.services.values():
            if not proc.running:
                proc.start()
        stack.wait_ready(timeout=120)


@pytest.fixture(autouse=True)
def _all_serving(stack: Stack) -> None:
    """Each fault test starts from a healthy stack."""
    stack.wait_ready(timeout=90)
