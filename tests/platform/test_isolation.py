"""Failure isolation: one project poisoned in every stage never delays another project.

The loop's six consumer groups run as real :class:`EventWorker` s over the loop's real
topics, on the embedded log and over the Kafka protocol (librdkafka's mock cluster).
Each stage's handler passes events on like the services do; for project ``bad`` every
handler raises (a broken input), in every stage at once. Project ``good`` registers a
dataset and answers three rounds; it must finish them while ``bad``'s events are still
being retried (so nothing of ``bad`` ever sat in front of it), and ``bad``'s events must
end parked per project and stage, visible as stage state.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from histoloop import events
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.base import EventBus
from histoloop.bus.embedded import EmbeddedBus
from histoloop.bus.kafka import KafkaBus
from histoloop.stages import STAGES, latest_states, list_dead_letters, read_states
from histoloop.v1 import events_pb2
from histoloop.worker import EventWorker
from tests.platform.test_bus_contract import FAST_GROUPS

pytestmark = pytest.mark.timeout(120)

ROUNDS = 3
MAX_ATTEMPTS = 4
BACKOFF = 1.0  # parked after 1 + 2 + 4 = 7 s of retries: the good project must be done by then

# stage → (topic it consumes, message type it publishes)
PIPELINE: dict[str, list[tuple[str, type | None]]] = {
    "tiling": [(events.DATASET_REGISTERED, events_pb2.TilesReady)],
    "embedding": [(events.TILES_READY, events_pb2.EmbeddingsReady)],
    "training": [(events.LABELS_COMMITTED, events_pb2.ModelTrained)],
    "prediction": [(events.MODEL_TRAINED, events_pb2.PredictionsReady)],
    "acquisition": [
        (events.EMBEDDINGS_READY, events_pb2.QuerySetReady),
        (events.PREDICTIONS_READY, events_pb2.QuerySetReady),
    ],
}


@pytest.fixture(params=["embedded", "kafka"], ids=["embedded", "kafka"])
def make_bus(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], EventBus]]:
    buses: list[EventBus] = []
    if request.param == "embedded":

        def new() -> EventBus:
            buses.append(EmbeddedBus(tmp_path / "events.sqlite"))
            return buses[-1]
    else:
        broker = request.getfixturevalue("kafka_broker")
        prefix = f"iso{uuid.uuid4().hex[:8]}."

        def new() -> EventBus:
            buses.append(
                KafkaBus(
                    broker.bootstrap,
                    topic_prefix=prefix,
                    client_id="isolation-test",
                    api_version=broker.api_version,
                    publish_timeout=10,
                    **FAST_GROUPS,
                )
            )
            return buses[-1]

    yield new
    for bus in buses:
        bus.close()


def _stage_handler(bus: EventBus, out: type) -> Callable:
    def handle(message, record) -> None:
        meta = message.meta
        if meta.project == "bad":
            raise RuntimeError(f"{record.topic}: broken input of project bad")
        events.publish(
            bus,
            out(
                meta=events.new_meta(
                    project=meta.project,
                    dataset=meta.dataset,
                    producer="test",
                    event_id=events.derived_id(meta.event_id, record.topic),
                )
            ),
        )

    return handle


def test_poison_in_every_stage_never_delays_another_project(make_bus, tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    arrivals: queue.Queue = queue.Queue()
    workers = []
    for stage, routes in PIPELINE.items():
        bus = make_bus()
        workers.append(
            EventWorker(
                group=stage,
                bus=bus,
                store=store,
                poll_timeout=0.05,
                max_attempts=MAX_ATTEMPTS,
                backoff=BACKOFF,
                handlers={topic: _stage_handler(bus, out) for topic, out in routes},
            )
        )
    workers.append(
        EventWorker(  # the annotation store: records query sets
            group="annotation_store",
            bus=make_bus(),
            store=store,
            poll_timeout=0.05,
            handlers={
                events.QUERYSET_READY: lambda m, r: arrivals.put((m.meta.project, time.monotonic()))
            },
        )
    )
    for worker in workers:
        worker.start()
    client = make_bus()
    failures_before = _sample("histoloop_stage_failures_total", "training")
    try:
        # the poison first, in every stage, so that it sits in front of everything of "good"
        poison = {}
        for topic, cls in [
            (events.DATASET_REGISTERED, events_pb2.DatasetRegistered),
            (events.TILES_READY, events_pb2.TilesReady),
            (events.LABELS_COMMITTED, events_pb2.LabelsCommitted),
            (events.MODEL_TRAINED, events_pb2.ModelTrained),
            (events.EMBEDDINGS_READY, events_pb2.EmbeddingsReady),
        ]:
            poison[topic] = events.publish(
                client, cls(meta=events.new_meta(project="bad", dataset="d1", producer="test"))
            )
        started = time.monotonic()
        events.publish(
            client,
            events_pb2.DatasetRegistered(
                meta=events.new_meta(project="good", dataset="d1", producer="test")
            ),
        )
        assert arrivals.get(timeout=60)[0] == "good"  # cold start
        for round_ in range(1, ROUNDS + 1):
            events.publish(
                client,
                events_pb2.LabelsCommitted(
                    meta=events.new_meta(project="good", dataset="d1", producer="test"),
                    label_version=round_,
                ),
            )
            assert arrivals.get(timeout=60)[0] == "good"
        good_done = time.monotonic()
        # nothing of "bad" was parked yet: the good project never waited for its retries
        assert not any(list_dead_letters(store, "bad", stage) for stage in STAGES), (
            f"good project took {good_done - started:.1f}s, longer than bad's retries"
        )
        deadline = time.monotonic() + 60
        while sum(len(list_dead_letters(store, "bad", s)) for s in STAGES) < len(poison):
            assert time.monotonic() < deadline, "bad events were not parked"
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.stop(5)
    letters = {d.topic: d for s in STAGES for d in list_dead_letters(store, "bad", s)}
    assert {t: d.event_id for t, d in letters.items()} == poison
    assert all(d.attempts == MAX_ATTEMPTS and "broken input" in d.error for d in letters.values())
    states = {(r.stage, r.state) for r in latest_states(read_states(store, "bad"))}
    assert {
        ("tiling", "parked"),
        ("embedding", "parked"),
        ("training", "parked"),
        ("prediction", "parked"),
        ("acquisition", "parked"),
    } <= states
    good = {r.stage: r.state for r in latest_states(read_states(store, "good"))}
    assert all(good[s] == "done" for s in STAGES)
    assert _sample("histoloop_stage_failures_total", "training") - failures_before == MAX_ATTEMPTS
    assert _sample("histoloop_dead_letters_total", "tiling") >= 1
    assert arrivals.empty()  # bad never produced a query set
    # parked events were acknowledged only once parked: nothing is left on the bus
    for worker in workers:
        lag = make_bus().consumer(worker.group, sorted(worker._handlers)).lag()
        assert sum(lag.values()) == 0, (worker.group, lag)


def test_deferred_event_survives_a_restart_and_succeeds_once_fixed(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    store = LocalArtifactStore(tmp_path / "artifacts")
    fixed = False
    seen: list[int] = []

    def handler(message, record) -> None:
        if not fixed:
            raise RuntimeError("slide missing")
        seen.append(message.label_version)

    def worker() -> EventWorker:
        return EventWorker(
            group="training",
            bus=bus,
            store=store,
            poll_timeout=0.05,
            max_attempts=50,
            backoff=0.05,
            max_backoff=0.1,
            handlers={events.LABELS_COMMITTED: handler},
        )

    first = worker()
    first.start()
    events.publish(
        bus,
        events_pb2.LabelsCommitted(
            meta=events.new_meta(project="p", producer="test"), label_version=3
        ),
    )
    deadline = time.monotonic() + 10
    while not list(store.list("_retry/training/")):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    first.stop(5)
    # its offset is committed (the consumer moved on) but the event is kept for retries
    assert bus.consumer("training", [events.LABELS_COMMITTED]).lag() == {events.LABELS_COMMITTED: 0}
    states = latest_states(read_states(store, "p"))
    assert states[0].state == "failed" and "slide missing" in states[0].error
    fixed = True
    second = worker()
    second.start()
    deadline = time.monotonic() + 10
    while seen != [3]:
        assert time.monotonic() < deadline, "deferred event was not resumed"
        time.sleep(0.05)
    second.stop(5)
    assert latest_states(read_states(store, "p"))[0].state == "done"


def test_dead_letter_body_names_project_stage_and_error(tmp_path: Path) -> None:
    bus = EmbeddedBus(tmp_path / "events.sqlite")
    store = LocalArtifactStore(tmp_path / "artifacts")
    w = EventWorker(
        group="prediction",
        bus=bus,
        store=store,
        poll_timeout=0.05,
        max_attempts=1,
        handlers={events.MODEL_TRAINED: lambda m, r: 1 / 0},
    )
    w.start()
    event_id = events.publish(
        bus, events_pb2.ModelTrained(meta=events.new_meta(project="p", producer="t"))
    )
    deadline = time.monotonic() + 10
    while not store.exists(f"_deadletter/prediction/p/{event_id}.json"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    w.stop(5)
    body = json.loads(store.get(f"_deadletter/prediction/p/{event_id}.json"))
    assert body["attempts"] == 1 and "division by zero" in body["error"]


def _sample(name: str, stage: str) -> float:
    return REGISTRY.get_sample_value(name, {"stage": stage}) or 0.0
