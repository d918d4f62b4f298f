"""A pathologist's side of the loop, over gRPC only, plus read-only views of the bus and store.

:class:`ProjectLoop` creates a project, registers the Visium-like dataset, watches
``WatchQuerySets`` and answers query sets from a synthetic ground truth (three bands of
the spot grid by array row). :func:`read_events` reads a topic of the stack's Kafka
broker from the beginning (no consumer group: it commits nothing and disturbs no
service); :func:`artifact_uris` lists every artifact URI an event refers to.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
from google.protobuf.message import Message

from histoloop import events
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc, common_pb2, training_pb2
from tests.e2e.stack import Stack

__all__ = [
    "BANDS",
    "BusEvent",
    "ProjectLoop",
    "artifact_uris",
    "band_of",
    "read_events",
    "wait_for",
]

BANDS = ("upper", "middle", "lower")
_COLOURS = ("#e69f00", "#56b4e9", "#009e73")


def band_of(array_row: int) -> str:
    """Synthetic ground truth: three horizontal bands of the grid."""
    return "upper" if array_row <= 7 else "middle" if array_row <= 12 else "lower"


def wait_for(
    what: str, check: Callable[[], object], timeout: float, interval: float = 0.5
) -> object:
    """Poll ``check`` until it returns something truthy; its value (AssertionError on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class ProjectLoop:
    """One project driven over gRPC like a pathologist would (with the admin or a given token)."""

    def __init__(
        self,
        stack: Stack,
        spatial: Path,
        slide: Path,
        *,
        project_id: str | None = None,
        query_size: int = 8,
        head: str = "logreg",
        token: str | None = None,
    ) -> None:
        self.stack = stack
        self.project_id = project_id or f"e2e-{uuid.uuid4().hex[:8]}"
        self.spatial = spatial
        self.slide = slide
        self.query_size = query_size
        self.head = head
        self.token = token
        positions = pd.read_csv(spatial / "tissue_positions.csv")
        self.truth = {
            str(b): band_of(int(r))
            for b, r in zip(positions.barcode, positions.array_row, strict=True)
        }
        self.truth_in_tissue = {
            str(b) for b, t in zip(positions.barcode, positions.in_tissue, strict=True) if t
        }
        self.labelled: set[str] = set()
        self.submitted: list[pb.SubmitLabelsResponse] = []
        self._arrivals: queue.Queue = queue.Queue()
        self._stream: grpc.Future | None = None
        self._seen: list[pb.QuerySet] = []

    @property
    def store(self) -> annotation_store_pb2_grpc.AnnotationStoreServiceStub:
        """The annotation store's stub (the loop's token)."""
        return self.stack.store_stub(self.token)

    # setup ---------------------------------------------------------------------------------
    def create(self) -> pb.Project:
        """CreateProject: three classes, MORPHOLOGY features, the logreg head, small query sets."""
        return self.stack.store_stub().CreateProject(
            pb.CreateProjectRequest(
                project_id=self.project_id,
                name=f"e2e {self.project_id}",
                classes=[
                    common_pb2.ClassDef(name=n, color=c)
                    for n, c in zip(BANDS, _COLOURS, strict=True)
                ],
                config=common_pb2.LoopConfig(
                    strategy="activevisium",
                    cold_start_strategy="coldstart_kmeans",
                    query_size=self.query_size,
                    seed=0,
                    head=self.head,
                    features=common_pb2.FEATURE_SET_MORPHOLOGY,
                    augment_views=0,
                ),
            ),
            timeout=30,
        )  # no views: fault tests, not 11× embedding

    def register(self, dataset_id: str = "cmu") -> pb.Dataset:
        """RegisterDataset: the spot grid on the real slide (the store copies both to S3)."""
        return self.stack.store_stub().RegisterDataset(
            pb.RegisterDatasetRequest(
                project_id=self.project_id,
                dataset_id=dataset_id,
                kind=common_pb2.DATASET_KIND_VISIUM,
                spatial_dir=str(self.spatial),
                slide_path=str(self.slide),
            ),
            timeout=60,
        )

    def watch(self) -> None:
        """Open WatchQuerySets; query sets arrive in the background."""
        stream = self.store.WatchQuerySets(
            pb.WatchQuerySetsRequest(project_id=self.project_id, include_latest=True)
        )
        self._stream = stream

        def pump() -> None:
            try:
                for query_set in stream:
                    self._arrivals.put(query_set)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    self._arrivals.put(exc)

        threading.Thread(target=pump, name=f"watch-{self.project_id}", daemon=True).start()

    def close(self) -> None:
        """Cancel the watch stream."""
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    # the loop ------------------------------------------------------------------------------
    def next_query_set(self, after_round: int, timeout: float = 120.0) -> pb.QuerySet:
        """The first query set of a round after ``after_round`` from the watch stream.

        If the stream broke (its server restarted), it is reopened and polled again.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no query set after round {after_round} within {timeout:.0f}s "
                    f"for {self.project_id}"
                )
            try:
                item = self._arrivals.get(timeout=min(remaining, 5.0))
            except queue.Empty:
                continue
            if isinstance(item, grpc.RpcError):
                time.sleep(1.0)
                self.watch()  # the store restarted: reopen (include_latest replays the newest)
                continue
            self._seen.append(item)
            if item.round > after_round or (after_round < 0 and item.round == 0):
                return item

    def answer(
        self, query_set: pb.QuerySet, *, batch_id: str | None = None, timeout: float = 60.0
    ) -> pb.SubmitLabelsResponse:
        """SubmitLabels with the ground truth of every spot the query set asks for."""
        labels = [
            pb.SpotLabel(barcode=s.barcode, label=self.truth[s.barcode]) for s in query_set.spots
        ]
        reply = self.store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=self.project_id,
                dataset_id=query_set.spots[0].dataset,
                labels=labels,
                batch_id=batch_id or f"{self.project_id}-r{query_set.round}",
                queryset_id=query_set.queryset_id,
            ),
            timeout=timeout,
        )
        self.labelled.update(s.barcode for s in query_set.spots)
        self.submitted.append(reply)
        return reply

    def start(self, dataset_id: str = "cmu", timeout: float = 150.0) -> pb.QuerySet:
        """Create, watch, register; the cold-start query set (round 0)."""
        self.create()
        self.watch()
        self.register(dataset_id)
        return self.next_query_set(-1, timeout)

    def models(self) -> list[training_pb2.ModelInfo]:
        """The project's models (TrainingService.ListModels)."""
        return list(
            self.stack.training_stub(self.token)
            .ListModels(training_pb2.ListModelsRequest(project_id=self.project_id), timeout=30)
            .models
        )

    def query_sets(self) -> list[pb.QuerySet]:
        """The query sets the annotation store recorded (ListQuerySets)."""
        return list(
            self.store.ListQuerySets(
                pb.ListQuerySetsRequest(project_id=self.project_id), timeout=30
            ).query_sets
        )


# the bus -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BusEvent:
    """One record on the broker, decoded."""

    topic: str
    key: str
    event_id: str
    partition: int
    offset: int
    message: Message
    value: bytes
    """The record's bytes as they are on the broker."""


def read_events(
    stack: Stack,
    topics: tuple[str, ...] = tuple(events.TOPICS),
    *,
    project: str | None = None,
    timeout: float = 20.0,
) -> list[BusEvent]:
    """Every record of ``topics`` from the beginning up to the current end (no group, no commit)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(
        bootstrap_servers=[stack.kafka.bootstrap],
        api_version=(2, 3),
        enable_auto_commit=False,
        consumer_timeout_ms=1000,
        request_timeout_ms=15000,
        connections_max_idle_ms=60000,
    )
    try:
        partitions = []
        for topic in topics:
            wire = stack.topic_prefix + topic
            for p in sorted(consumer.partitions_for_topic(wire) or ()):
                partitions.append(TopicPartition(wire, p))
        if not partitions:
            return []
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        out: list[BusEvent] = []
        deadline = time.monotonic() + timeout
        while any(consumer.position(tp) < ends[tp] for tp in partitions):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {topics} to the end within {timeout:.0f}s")
            for tp, messages in consumer.poll(timeout_ms=500).items():
                topic = tp.topic[len(stack.topic_prefix) :]
                for msg in messages:
                    if msg.offset >= ends[tp]:
                        continue
                    message = events.TOPICS[topic]()
                    message.ParseFromString(msg.value)
                    event_id = dict(msg.headers or []).get("event_id", b"").decode()
                    out.append(
                        BusEvent(
                            topic,
                            (msg.key or b"").decode(),
                            event_id,
                            tp.partition,
                            msg.offset,
                            message,
                            bytes(msg.value),
                        )
                    )
        if project is not None:
            out = [e for e in out if e.key == project]
        return sorted(out, key=lambda e: (e.topic, e.partition, e.offset))
    finally:
        consumer.close()


def artifact_uris(message: Message) -> Iterator[tuple[str, str]]:
    """``(field name, URI)`` for every artifact URI in an event (nested and repeated fields too)."""
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            values = list(value.values())
        elif descriptor.label == descriptor.LABEL_REPEATED:
            values = list(value)
        else:
            values = [value]
        for item in values:
            if isinstance(item, Message):
                yield from artifact_uris(item)
            elif isinstance(item, str) and "://" in item:
                yield descriptor.name, item


CONSUMER_GROUPS: dict[str, tuple[str, ...]] = {
    "annotation_store": (events.QUERYSET_READY, events.EMBEDDINGS_READY),
    "tiling": (events.DATASET_REGISTERED,),
    "embedding": (events.TILES_READY,),
    "training": (events.LABELS_COMMITTED,),
    "prediction": (events.MODEL_TRAINED,),
    "acquisition": (events.EMBEDDINGS_READY, events.PREDICTIONS_READY),
}
"""Each service's consumer group (named after it) and the topics it consumes."""


def consumer_lag(stack: Stack) -> dict[tuple[str, str], int]:
    """Records not yet committed per (group, topic): end offsets minus committed offsets."""
    from kafka import KafkaConsumer, TopicPartition

    lag: dict[tuple[str, str], int] = {}
    for group, topics in CONSUMER_GROUPS.items():
        consumer = KafkaConsumer(
            bootstrap_servers=[stack.kafka.bootstrap],
            api_version=(2, 3),
            group_id=group,
            enable_auto_commit=False,
            request_timeout_ms=15000,
            connections_max_idle_ms=60000,
        )
        try:
            for topic in topics:
                wire = stack.topic_prefix + topic
                tps = [
                    TopicPartition(wire, p)
                    for p in sorted(consumer.partitions_for_topic(wire) or ())
                ]
                ends = consumer.end_offsets(tps) if tps else {}
                lag[(group, topic)] = sum(
                    max(ends[tp] - (consumer.committed(tp) or 0), 0) for tp in tps
                )
        finally:
            consumer.close(autocommit=False)
    return lag


def wait_caught_up(stack: Stack, timeout: float = 60.0) -> None:
    """Wait until every service's group has committed every record on its topics."""
    last: dict[tuple[str, str], int] = {}

    def caught_up() -> bool:
        last.clear()
        last.update({k: v for k, v in consumer_lag(stack).items() if v})
        return not last

    try:
        wait_for("every consumer group to catch up", caught_up, timeout, interval=1.0)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; lag: {last}") from None


def republish(stack: Stack, records: list[BusEvent]) -> None:
    """Publish records again, byte for byte (same key, value and event id), in the given order."""
    from kafka import KafkaProducer

    producer = KafkaProducer(
        bootstrap_servers=[stack.kafka.bootstrap],
        api_version=(2, 3),
        acks="all",
        connections_max_idle_ms=60000,
        request_timeout_ms=15000,
    )
    try:
        for record in records:
            producer.send(
                stack.topic_prefix + record.topic,
                key=record.key.encode(),
                value=record.value,
                headers=[("event_id", record.event_id.encode())],
            ).get(timeout=30)
    finally:
        producer.close(timeout=10)
