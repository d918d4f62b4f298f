"""Fuzz every public RPC with malformed and extreme requests (hypothesis), on one embedded server.

Requests are generated from the proto descriptors: every field unset or set to an edge value
(empty, huge and odd Unicode strings, path-like and URI-like strings, negative and huge
numbers, NaN and infinities, unknown enum values, many repeated entries, nested messages),
with ids that sometimes name the real project, dataset and spots so the calls get past the
first checks. For each call:

* the status is OK or a client error (INVALID_ARGUMENT, NOT_FOUND, …); INTERNAL only with its
  cause in the server log; never UNKNOWN or a dead server;
* a rejected call, and any call of a read-only RPC, leaves the store as it was: database
  rows, artifacts and the event log.

One ``histoloop.server.Server`` (all six services, embedded backends, tokens on) in this
process, with a real project whose cold-start query set is done before fuzzing starts.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from histoloop.config import Settings
from histoloop.server import Server
from histoloop.v1 import (
    acquisition_pb2,
    annotation_store_pb2,
    annotation_store_pb2_grpc,
    common_pb2,
    embedding_pb2,
    prediction_pb2,
    tiling_pb2,
    training_pb2,
)
from histoloop.v1 import annotation_store_pb2 as pb
from tests.e2e.loop import band_of

ADMIN = "adm-fuzz-0123456789abcdef"
PROJECT, DATASET = "fuzz", "cmu"
MAX_EXAMPLES = 50
CLIENT_ERRORS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED,
}
MUTATING = {
    "CreateProject",
    "AddClasses",
    "RegisterDataset",
    "RegisterAnnotator",
    "SubmitLabels",
    "ImportLoupeCsv",
    "TileDataset",
    "Train",
    "Simulate",
    "UpdateProject",
    "RetryStage",
    "RemoveDataset",
}
"""RPCs that may change the store when they succeed (all others never may)."""
_MODULES = (
    annotation_store_pb2,
    tiling_pb2,
    embedding_pb2,
    training_pb2,
    prediction_pb2,
    acquisition_pb2,
)


def _rpcs() -> list[tuple[str, str, Descriptor, bool]]:
    out = []
    for module in _MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out.append(
                    (
                        f"/{service.full_name}/{method.name}",
                        method.name,
                        method.input_type,
                        method.server_streaming,
                    )
                )
    return out


RPCS = _rpcs()


# strategies -------------------------------------------------------------------------------------
ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "\x00" * 64,
    "a" * 70_000,
    "é" * 5000,
    "💥" * 2000,
    "\u202eevil",
    "../" * 40,
    "../../../../nonexistent/file",
    "s3://histoloop/../x",
    "file:///nonexistent",
    "%s%n%x",
    "'; DROP TABLE projects; --",
    "help",
    "NaN",
    "-1",
    "{}",
    "\n\r\t",
    "ﷺ" * 100,
    "A" * 129,
]
_KNOWN: dict[str, list[str]] = {}


def _string(field: FieldDescriptor) -> st.SearchStrategy[str]:
    known = _KNOWN.get(field.name, [])
    parts = [st.text(max_size=40), st.sampled_from(ODD_STRINGS)]
    if known:
        parts.insert(0, st.sampled_from(known))
    return st.one_of(*parts)


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _scalar(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _string(field)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=64),
            st.sampled_from(
                [
                    b"",
                    b"\xff" * 32,
                    b"Barcode,G\n",
                    b"Barcode,G\n" + b"x,y\n" * 5000,
                    b"\x00" * 1_000_000,
                ]
            ),
        )
    if kind in _INT_RANGES:
        lo, hi = _INT_RANGES[kind]
        return st.one_of(
            st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, 3, 8, 224]), st.integers(0, 300)
        )
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(
            allow_nan=True,
            allow_infinity=True,
            width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64,
        )
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        values = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(values), st.integers(-3, 50))
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return _messages(field.message_type, depth + 1)
    raise AssertionError(f"unhandled field type {kind} of {field.full_name}")


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        return st.dictionaries(_scalar(key, depth), _scalar(value, depth), max_size=4)
    if field.label == FieldDescriptor.LABEL_REPEATED:
        element = _scalar(field, depth)
        many = st.integers(100, 3000).flatmap(lambda n: element.map(lambda v: [v] * n))
        return (
            st.one_of(st.lists(element, max_size=4), many)
            if depth == 0
            else st.lists(element, max_size=2)
        )
    return _scalar(field, depth)


def _messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 2:
        return st.just(cls())
    fields = {f.name: st.none() | _field(f, depth) for f in descriptor.fields}
    return st.fixed_dictionaries(fields).map(lambda values: _build(cls, values))


def _build(cls: type[Message], values: dict) -> Message:
    message = cls()
    for name, value in values.items():
        if value is None:
            continue
        field = cls.DESCRIPTOR.fields_by_name[name]
        target = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for k, v in value.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            if field.message_type is not None:
                for v in value:
                    target.add().CopyFrom(v)
            else:
                target.extend(value)
        elif field.message_type is not None:
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


# the server ----------------------------------------------------------------------------------------
class _Errors(logging.Handler):
    """Collects the server's ERROR records (the interceptor logs every INTERNAL's cause)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Fuzzed:
    """The server, a channel with the admin token and views of its store."""

    def __init__(self, server: Server, data_dir: Path, errors: _Errors) -> None:
        self.server = server
        self.data_dir = data_dir
        self.errors = errors
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{server.port}",
            options=[
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self.internal: list[tuple[str, str]] = []
        self.codes: Counter[str] = Counter()

    def call(self, path: str, request: Message, streaming: bool) -> tuple[grpc.StatusCode, str]:
        metadata = [("authorization", f"Bearer {ADMIN}")]
        try:
            if streaming:
                stream = self.channel.unary_stream(
                    path,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=bytes,
                )(request, timeout=1.0, metadata=metadata)
                for _ in stream:
                    pass
            else:
                self.channel.unary_unary(
                    path,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=bytes,
                )(request, timeout=60, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
        return grpc.StatusCode.OK, ""

    def snapshot(self) -> tuple:
        """Row counts of every table, the artifact files and the event log length."""
        with sqlite3.connect(f"file:{self.data_dir / 'store.sqlite'}?mode=ro", uri=True) as db:
            tables = [
                r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            ]
            rows = tuple(
                (t, db.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in sorted(tables)
            )
        with sqlite3.connect(f"file:{self.data_dir / 'events.sqlite'}?mode=ro", uri=True) as db:
            n_events = db.execute("SELECT count(*) FROM events").fetchone()[0]
        root = self.data_dir / "artifacts"
        files = tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()))
        return rows, n_events, files

    def settle(self, timeout: float = 60.0) -> tuple:
        """Wait until background work (relay, workers) leaves the store unchanged for a while."""
        deadline = time.monotonic() + timeout
        last, stable_since = self.snapshot(), time.monotonic()
        while time.monotonic() - stable_since < 1.5:
            if time.monotonic() > deadline:
                raise AssertionError("the server kept changing the store for a minute")
            time.sleep(0.25)
            now = self.snapshot()
            if now != last or any(w.busy.is_set() for w in self.server.workers):
                last, stable_since = now, time.monotonic()
        return last


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, visium: Path, slide: Path) -> Iterator[Fuzzed]:
    data_dir = tmp_path_factory.mktemp("fuzz")
    errors = _Errors()
    logging.getLogger().addHandler(errors)
    server = Server(
        Settings(
            data_dir=data_dir,
            grpc_port=0,
            metrics_port=0,
            auth="token",
            admin_token=ADMIN,
            service_token="svc-fuzz-0123456789abcdef",
            grace_seconds=2.0,
        )
    )
    server.start()
    state = Fuzzed(server, data_dir, errors)
    try:
        md = [("authorization", f"Bearer {ADMIN}")]
        store = annotation_store_pb2_grpc.AnnotationStoreServiceStub(state.channel)
        store.CreateProject(
            pb.CreateProjectRequest(
                project_id=PROJECT,
                name="fuzz",
                classes=[common_pb2.ClassDef(name=n) for n in ("upper", "middle", "lower")],
                config=common_pb2.LoopConfig(
                    query_size=8, head="logreg", features=common_pb2.FEATURE_SET_MORPHOLOGY
                ),
            ),
            metadata=md,
            timeout=30,
        )
        store.RegisterDataset(
            pb.RegisterDatasetRequest(
                project_id=PROJECT,
                dataset_id=DATASET,
                kind=common_pb2.DATASET_KIND_VISIUM,
                spatial_dir=str(visium),
                slide_path=str(slide),
            ),
            metadata=md,
            timeout=60,
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                qs = store.GetQuerySet(
                    pb.GetQuerySetRequest(project_id=PROJECT), metadata=md, timeout=10
                )
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        positions = pd.read_csv(visium / "tissue_positions.csv")
        truth = {
            str(b): band_of(int(r))
            for b, r in zip(positions.barcode, positions.array_row, strict=True)
        }
        _KNOWN.update(
            project_id=[PROJECT, "nope"],
            dataset_id=[DATASET],
            barcode=[s.barcode for s in qs.spots],
            label=["upper", "middle", "lower"],
            name=["upper", "lower"],
            annotator_id=["admin", "fuzzer"],
            queryset_id=[qs.queryset_id],
            strategy=["activevisium", "random", "entropy"],
            head=["logreg", "mlp"],
            model_version=[""],
            cold_start_strategy=["coldstart_kmeans"],
        )
        _KNOWN["barcode"] += list(truth)[:5]
        state.settle()
        yield state
    finally:
        state.channel.close()
        server.stop(2)
        logging.getLogger().removeHandler(errors)
        _KNOWN.clear()


def _check_one(fuzzed: Fuzzed, path: str, name: str, request: Message, streaming: bool) -> None:
    before = fuzzed.snapshot()
    n_errors = len(fuzzed.errors.records)
    code, details = fuzzed.call(path, request, streaming)
    fuzzed.codes[code.name] += 1
    if streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED:
        code = grpc.StatusCode.OK  # a watch on a real project waits for news
    if code == grpc.StatusCode.INTERNAL:
        causes = [r for r in fuzzed.errors.records[n_errors:] if r.exc_info]
        assert causes, f"{name}: INTERNAL without a logged cause: {details}"
        fuzzed.internal.append((name, details))
    else:
        assert code in CLIENT_ERRORS, f"{name}: {code.name} {details[:300]!r} for {request!s:.500}"
    if code == grpc.StatusCode.OK and name in MUTATING:
        fuzzed.settle()
        return
    after = fuzzed.snapshot()
    assert after == before, f"{name} ({code.name}) changed the store: {_diff(before, after)}"


def _diff(before: tuple, after: tuple) -> str:
    rows = [f"{a[0]}: {a[1]} → {b[1]}" for a, b in zip(before[0], after[0], strict=False) if a != b]
    files = sorted(set(after[2]) ^ set(before[2]))[:10]
    return f"rows {rows}, events {before[1]} → {after[1]}, files {files}"


@pytest.mark.parametrize("path, name, descriptor, streaming", RPCS, ids=[r[1] for r in RPCS])
def test_fuzz_rpc(
    fuzzed: Fuzzed, path: str, name: str, descriptor: Descriptor, streaming: bool
) -> None:
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )
    @given(request=_messages(descriptor))
    def run(request: Message) -> None:
        _check_one(fuzzed, path, name, request, streaming)

    fuzzed.codes.clear()
    run()
    print(f"{name}: {dict(fuzzed.codes)}")
    # still alive and answering
    reply = health_pb2_grpc.HealthStub(fuzzed.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    if fuzzed.internal:
        print(
            f"{name}: INTERNAL (cause logged) for {len(fuzzed.internal)} inputs: {fuzzed.internal[:3]}"
        )
        fuzzed.internal.clear()
