"""``histoloop`` client commands: every step of the annotation workflow without code.

Thin gRPC clients of the annotation store: ``project``, ``dataset``, ``annotator``,
``labels import``, ``export``, ``status``, ``watch``, ``agreement``. Each talks to
``--server host:port`` (default: the local embedded server at ``HISTOLOOP_GRPC_PORT``),
with ``--token`` (or ``HISTOLOOP_TOKEN``) and TLS from ``--tls-ca/--tls-cert/--tls-key``
(or ``HISTOLOOP_TLS_*``). Exit codes: 0 done, 1 failed (the server refused, a file is
unreadable, the server is down), 2 usage. ``--json`` prints machine-readable results.

Export file names follow ActiveVisium: ``TrainingAnnotations<strategy>.csv`` for the
cold-start query set (later rounds add ``_round<N>``), ``Predictions_with_help__<time>.csv``
for predictions with the query spots marked ``help``, ``ActiveVisium_annotations.csv``
for the labels; GeoJSON and PNG exports take the same stem. ``export … predictions --as X``
writes the predictions as annotator X's own model gives them, the stem ending ``__as_X``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from histoloop.errors import HistoloopError
from histoloop.stages import STAGE_OF_GROUP

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "UsageError", "add_commands", "default_filename"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_FORMATS = {
    "loupe": "EXPORT_FORMAT_LOUPE_CSV",
    "geojson": "EXPORT_FORMAT_GEOJSON",
    "png": "EXPORT_FORMAT_PNG",
}
_KINDS = {
    "queryset": "EXPORT_KIND_QUERY_SET",
    "predictions": "EXPORT_KIND_PREDICTIONS",
    "labels": "EXPORT_KIND_LABELS",
}
_EXTENSIONS = {"loupe": "csv", "geojson": "geojson", "png": "png"}
_ROLES = ("annotator", "expert", "admin", "service")
_BATCH_ID = re.compile(r"[^A-Za-z0-9_.@+-]")


class UsageError(HistoloopError):
    """The command line is wrong (exit code 2)."""


@dataclass
class _Client:
    """A connection to the annotation store and how to print results."""

    stub: Any
    address: str
    as_json: bool
    timeout: float

    def call(self, method: str, request: Message, **kwargs: Any) -> Any:
        """Call an RPC; a missing RPC (old client or server) says so by name."""
        rpc = getattr(self.stub, method, None)
        if rpc is None:
            raise _Unsupported(method)
        try:
            return rpc(request, timeout=kwargs.pop("timeout", self.timeout), **kwargs)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _Unsupported(method) from None
            raise

    def emit(self, data: dict[str, Any] | list[Any], text: str) -> None:
        """Print ``data`` as JSON with ``--json``, else the human-readable ``text``."""
        print(json.dumps(data, indent=1, sort_keys=True) if self.as_json else text)


class _Unsupported(Exception):
    def __init__(self, method: str) -> None:
        super().__init__(f"server does not support {method} (update the server, or this client)")


def _pb() -> Any:
    from histoloop.v1 import annotation_store_pb2

    return annotation_store_pb2


def _common() -> Any:
    from histoloop.v1 import common_pb2

    return common_pb2


def _as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


# connection ------------------------------------------------------------------------------
def _connect(args: argparse.Namespace) -> tuple[grpc.Channel, _Client]:
    from histoloop.channels import make_channel
    from histoloop.config import load_settings
    from histoloop.v1 import annotation_store_pb2_grpc

    overrides = {
        name: Path(value)
        for name, value in (
            ("tls_ca", args.tls_ca),
            ("tls_cert", args.tls_cert),
            ("tls_key", args.tls_key),
        )
        if value
    }
    settings = load_settings(**overrides)
    address = args.server or f"127.0.0.1:{settings.grpc_port or 50051}"
    token = args.token if args.token is not None else os.environ.get("HISTOLOOP_TOKEN")
    channel = make_channel(address, settings, token=token)
    client = _Client(
        annotation_store_pb2_grpc.AnnotationStoreServiceStub(channel),
        address,
        args.json,
        args.timeout,
    )
    return channel, client


def _run(
    handler: Callable[[argparse.Namespace, _Client], int],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: connect, run, turn every failure into a message and an exit code."""

    def run(args: argparse.Namespace) -> int:
        try:
            channel, client = _connect(args)
        except HistoloopError as exc:
            print(f"histoloop: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        try:
            with channel:
                return handler(args, client)
        except UsageError as exc:
            print(f"histoloop: usage: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except _Unsupported as exc:
            print(f"histoloop: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                message = f"cannot reach the server at {client.address} ({exc.details()}); is `histoloop serve` running?"
            else:
                message = f"{exc.details()} [{code.name}]"
            print(f"histoloop: error: {message}", file=sys.stderr)
            return EXIT_FAILED
        except (HistoloopError, OSError) as exc:
            print(f"histoloop: error: {exc}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("histoloop: interrupted", file=sys.stderr)
            return 130

    return run


# projects -------------------------------------------------------------------------------
def _enum_prefix(field: FieldDescriptor) -> str:
    """``FEATURE_SET_`` for a ``FeatureSet`` field: what its value names start with."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", field.enum_type.name).upper() + "_"


def _config_value(field: FieldDescriptor, key: str, raw: str) -> Any:
    if field.type == FieldDescriptor.TYPE_ENUM:
        names = {v.name: v.number for v in field.enum_type.values}
        prefix = _enum_prefix(field)
        value = names.get(prefix + raw.upper()) or names.get(raw.upper())
        if value is None:
            choices = ", ".join(
                n[len(prefix) :].lower() for n in names if not n.endswith("UNSPECIFIED")
            )
            raise UsageError(f"--set {key}: {raw!r} is not one of {choices}")
        return value
    try:
        if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return float(raw)
        if field.type == FieldDescriptor.TYPE_BOOL:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if field.type == FieldDescriptor.TYPE_STRING:
            return raw
        return int(raw)
    except ValueError:
        raise UsageError(f"--set {key}: {raw!r} is not a valid value") from None


def _loop_config(pairs: Sequence[str]) -> tuple[Message, list[str]]:
    """``key=value`` pairs → a LoopConfig and the field mask of the keys given."""
    config = _common().LoopConfig()
    fields = config.DESCRIPTOR.fields_by_name
    mask: list[str] = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: expected key=value")
        if key not in fields:
            raise UsageError(
                f"--set {key}: not a project setting (one of {', '.join(sorted(fields))})"
            )
        setattr(config, key, _config_value(fields[key], key, raw.strip()))
        mask.append(key)
    return config, mask


def _plain_config(config: Message) -> dict[str, Any]:
    """A LoopConfig as ``name → value`` with enum values in the words ``--set`` takes."""
    plain = _as_dict(config)
    for field in config.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_ENUM and field.name in plain:
            prefix = _enum_prefix(field)
            plain[field.name] = str(plain[field.name]).removeprefix(prefix).lower()
    return plain


def _project_text(project: Message) -> str:
    config = _plain_config(project.config)
    lines = [
        f"project {project.project_id} ({project.name})",
        "classes: " + ", ".join(f"{c.name} {c.color}" for c in project.classes),
        "datasets: " + (", ".join(project.datasets) or "none yet"),
        f"label batches: {project.label_version}",
        "config: " + ", ".join(f"{k}={v}" for k, v in sorted(config.items())),
    ]
    return "\n".join(lines)


def _project_create(args: argparse.Namespace, client: _Client) -> int:
    pb, common = _pb(), _common()
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    colors = [c.strip() for c in args.colors.split(",")] if args.colors else []
    if not classes:
        raise UsageError("--classes: give the class names, comma-separated (e.g. Tumour,Stroma)")
    if colors and len(colors) != len(classes):
        raise UsageError(f"--colors: {len(colors)} colours for {len(classes)} classes")
    settings = [
        f"{k}={v}"
        for k, v in (
            ("strategy", args.strategy),
            ("features", args.features),
            ("query_size", args.query_size),
            ("head", args.head),
        )
        if v
    ]
    config, _mask = _loop_config([*settings, *(args.set or ())])
    project = client.call(
        "CreateProject",
        pb.CreateProjectRequest(
            project_id=args.project,
            name=args.name or args.project,
            config=config,
            classes=[
                common.ClassDef(name=n, color=colors[i] if colors else "")
                for i, n in enumerate(classes)
            ],
        ),
    )
    client.emit(_as_dict(project), _project_text(project))
    return EXIT_OK


def _project_show(args: argparse.Namespace, client: _Client) -> int:
    project = client.call("GetProject", _pb().GetProjectRequest(project_id=args.project))
    client.emit(_as_dict(project), _project_text(project))
    return EXIT_OK


def _project_list(args: argparse.Namespace, client: _Client) -> int:
    projects = client.call("ListProjects", _pb().ListProjectsRequest()).projects
    rows = [
        f"{p.project_id:<24} {len(p.classes):>3} classes {len(p.datasets):>3} datasets  {p.name}"
        for p in projects
    ]
    client.emit([_as_dict(p) for p in projects], "\n".join(rows) or "no projects yet")
    return EXIT_OK


def _project_config(args: argparse.Namespace, client: _Client) -> int:
    pb = _pb()
    if not args.set:
        project = client.call("GetProject", pb.GetProjectRequest(project_id=args.project))
        config = _plain_config(project.config)
        client.emit(config, "\n".join(f"{k}={v}" for k, v in sorted(config.items())))
        return EXIT_OK
    config, mask = _loop_config(args.set)
    # the named fields are set even to an empty/zero value (e.g. smoothing=0 turns it off)
    project = client.call(
        "UpdateProject",
        pb.UpdateProjectRequest(
            project_id=args.project, config=config, reset_fields=mask, reason=args.reason or ""
        ),
    )
    client.emit(_as_dict(project), _project_text(project))
    return EXIT_OK


# datasets, annotators -------------------------------------------------------------------
def _dataset_text(d: Message) -> str:
    kind = _common().DatasetKind.Name(d.kind).removeprefix("DATASET_KIND_").lower()
    units = "tiles" if kind == "wsi" else "spots"
    state = (
        "removed"
        if d.HasField("removed_at")
        else "embedded"
        if d.embeddings_uri
        else "not embedded yet"
    )
    return f"{d.dataset_id:<20} {kind:<7} {d.n_in_tissue:>6} {units} in tissue  {state}"


def _absolute(path: str | None, flag: str) -> str:
    if not path:
        return ""
    if "://" in path:
        return path
    resolved = Path(path).expanduser().resolve()
    if not resolved.exists():
        raise HistoloopError(f"{flag}: {path} does not exist")
    return str(resolved)


def _dataset_add(args: argparse.Namespace, client: _Client) -> int:
    pb, common = _pb(), _common()
    if args.visium:
        request = pb.RegisterDatasetRequest(
            project_id=args.project,
            dataset_id=args.dataset,
            kind=common.DATASET_KIND_VISIUM,
            spatial_dir=_absolute(args.visium, "--visium"),
            slide_path=_absolute(args.slide, "--slide"),
            expression_path=_absolute(args.counts, "--counts"),
            slide_scale=args.slide_scale or 0.0,
        )
    else:
        if args.slide or args.counts or args.slide_scale:
            raise UsageError(
                "--slide, --counts and --slide-scale go with --visium; a WSI is --wsi FILE"
            )
        request = pb.RegisterDatasetRequest(
            project_id=args.project,
            dataset_id=args.dataset,
            kind=common.DATASET_KIND_WSI,
            slide_path=_absolute(args.wsi, "--wsi"),
            tile_size=args.tile_size or 0,
            mpp=args.mpp or 0.0,
        )
    dataset = client.call("RegisterDataset", request, timeout=max(client.timeout, 600))
    if args.wait:
        dataset = _wait_embedded(client, args.project, args.dataset, args.wait)
    client.emit(_as_dict(dataset), "registered " + _dataset_text(dataset))
    return EXIT_OK


def _wait_embedded(client: _Client, project: str, dataset_id: str, timeout: float) -> Message:
    """Wait (with a progress bar) until the dataset is tiled, embedded and has a query set."""
    from tqdm import tqdm

    pb = _pb()
    stages = ["registered", "embedded", "query set ready"]
    deadline = time.monotonic() + timeout
    with tqdm(
        total=len(stages),
        desc=f"{dataset_id}: registered",
        unit="stage",
        file=sys.stderr,
        disable=client.as_json,
    ) as bar:
        bar.update(1)
        while True:
            found = [
                d
                for d in client.call(
                    "ListDatasets", pb.ListDatasetsRequest(project_id=project)
                ).datasets
                if d.dataset_id == dataset_id
            ]
            done = 1
            if found and found[0].embeddings_uri:
                done = 2
                try:
                    qs = client.call("GetQuerySet", pb.GetQuerySetRequest(project_id=project))
                    done = 3 if any(s.dataset in ("", dataset_id) for s in qs.spots) else 2
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            if done > bar.n:
                bar.set_description(f"{dataset_id}: {stages[done - 1]}")
                bar.update(done - bar.n)
            if done == len(stages):
                return found[0]
            if time.monotonic() > deadline:
                raise HistoloopError(
                    f"dataset {dataset_id}: still {stages[done - 1]} after {timeout:.0f}s"
                )
            time.sleep(0.5)


def _dataset_list(args: argparse.Namespace, client: _Client) -> int:
    datasets = client.call(
        "ListDatasets", _pb().ListDatasetsRequest(project_id=args.project)
    ).datasets
    client.emit(
        [_as_dict(d) for d in datasets],
        "\n".join(_dataset_text(d) for d in datasets) or "no datasets yet",
    )
    return EXIT_OK


def _dataset_remove(args: argparse.Namespace, client: _Client) -> int:
    reply = client.call(
        "RemoveDataset",
        _pb().RemoveDatasetRequest(
            project_id=args.project, dataset_id=args.dataset, reason=args.reason or ""
        ),
    )
    client.emit(_as_dict(reply), f"removed dataset {args.dataset} from project {args.project}")
    return EXIT_OK


def _annotator_add(args: argparse.Namespace, client: _Client) -> int:
    pb = _pb()
    role = getattr(pb, f"ANNOTATOR_ROLE_{args.role.upper()}")
    reply = client.call(
        "RegisterAnnotator",
        pb.RegisterAnnotatorRequest(
            annotator_id=args.annotator,
            display_name=args.name or "",
            role=role,
            projects=args.project or [],
        ),
    )
    client.emit(
        _as_dict(reply),
        f"annotator {reply.annotator_id}; token (shown once, keep it safe):\n{reply.token}",
    )
    return EXIT_OK


# labels, exports -------------------------------------------------------------------------
def _batch_id(path: Path, data: bytes) -> str:
    """A batch id derived from the file, so importing the same file twice is a no-op."""
    stem = _BATCH_ID.sub("-", path.stem).strip("-.") or "file"
    return f"{stem[:100]}-{hashlib.sha256(data).hexdigest()[:16]}"


def _labels_import(args: argparse.Namespace, client: _Client) -> int:
    pb = _pb()
    path = Path(args.file)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".geojson", ".json"):
        raise UsageError(
            f"{path}: a Loupe .csv or a QuPath .geojson file, not {suffix or 'no extension'}"
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HistoloopError(f"{path}: {exc.strerror}") from None
    common = {
        "project_id": args.project,
        "dataset_id": args.dataset,
        "batch_id": args.batch_id or _batch_id(path, data),
        "add_missing_classes": args.add_missing_classes,
        "annotator_id": args.annotator or "",
        "queryset_id": args.queryset or "",
    }
    try:
        if suffix == ".csv":
            reply = client.call("ImportLoupeCsv", pb.ImportLoupeCsvRequest(csv=data, **common))
        else:
            reply = client.call("ImportGeoJson", pb.ImportGeoJsonRequest(geojson=data, **common))
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND):
            raise HistoloopError(f"{path}: {exc.details()}") from None
        raise
    text = (
        f"{path.name}: {reply.n_labels} labels committed as batch {reply.batch_id} "
        f"(label version {reply.label_version}, {reply.n_placeholders} help placeholders skipped"
        + (f", {reply.n_empty} rows with an empty label skipped" if reply.n_empty else "")
        + ")"
    )
    if reply.duplicate:
        text = f"{path.name}: imported before as batch {reply.batch_id}; nothing changed"
    client.emit(_as_dict(reply), text)
    return EXIT_OK


def default_filename(kind: str, fmt: str, query_set: Message | None) -> str:
    """ActiveVisium's file name for an export (see the module docstring)."""
    if kind == "labels":
        stem = "ActiveVisium_annotations"
    elif kind == "predictions":
        when = query_set.created_at.ToDatetime() if query_set is not None else None
        stem = "Predictions_with_help__" + (
            when.strftime("%Y-%m-%d_%H-%M-%S") if when else "latest"
        )
    else:
        strategy = (
            re.sub(r"[^A-Za-z0-9_-]", "_", query_set.strategy) if query_set is not None else ""
        )
        stem = f"TrainingAnnotations{strategy}"
        if query_set is not None and query_set.round > 0:
            stem += f"_round{query_set.round}"
    return f"{stem}.{_EXTENSIONS[fmt]}"


def _export_one(
    client: _Client,
    project: str,
    dataset: str,
    kind: str,
    fmt: str,
    queryset_id: str,
    out: Path | None,
    folder: Path | None = None,
    annotator: str = "",
) -> tuple[Path, int]:
    pb = _pb()
    query_set = None
    if kind != "labels":
        query_set = client.call(
            "GetQuerySet", pb.GetQuerySetRequest(project_id=project, queryset_id=queryset_id)
        )
        queryset_id = query_set.queryset_id
    reply = client.call(
        "ExportLabels",
        pb.ExportLabelsRequest(
            project_id=project,
            dataset_id=dataset,
            kind=getattr(pb, _KINDS[kind]),
            queryset_id=queryset_id,
            format=getattr(pb, _FORMATS[fmt]),
            annotator_id=annotator,
        ),
    )
    name = default_filename(kind, fmt, query_set)
    if annotator:  # one file per annotator's view
        stem, _, extension = name.rpartition(".")
        name = f"{stem}__as_{re.sub(r'[^A-Za-z0-9_-]', '_', annotator)}.{extension}"
    target = out or (folder or Path.cwd()) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(reply.content or reply.csv)
    tmp.replace(target)
    return target, reply.n_rows


def _export(args: argparse.Namespace, client: _Client) -> int:
    out = Path(args.output) if args.output else None
    if out is not None and out.is_dir():
        out, folder = None, Path(args.output)
    else:
        folder = None
    target, n = _export_one(
        client,
        args.project,
        args.dataset,
        args.kind,
        args.format,
        args.queryset or "",
        out,
        folder,
        args.as_annotator or "",
    )
    client.emit(
        {"file": str(target), "rows": n, "kind": args.kind, "format": args.format},
        f"wrote {target} ({n} {'units' if args.format != 'loupe' else 'rows'})",
    )
    return EXIT_OK


# status, watch, agreement ------------------------------------------------------------------
def _status_text(status: Message) -> str:
    st = _as_dict(status)
    lines = [
        f"project {status.project_id}: round {status.round}, {status.n_labelled} of {status.n_spots} "
        f"units labelled ({status.label_version} label batches, {status.n_disputed} disputed)"
    ]
    for name, n in sorted(status.labelled_per_class.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<24} {n:>6}")
    if status.latest_model_version:
        metrics = ", ".join(
            f"{k}={v}"
            for k, v in sorted(st.get("latest_metrics", {}).items())
            if not isinstance(v, (dict, list))
        )
        lines.append(f"model {status.latest_model_version}: {metrics or 'no metrics'}")
    else:
        lines.append("model: none yet")
    stopping = st.get("stopping")
    if stopping:
        lines.append("stopping: " + ", ".join(f"{k}={v}" for k, v in sorted(stopping.items())))
    if status.notice:
        lines.append(f"waiting: {status.notice}")
    lines.append(f"events waiting to be published: {status.pending_events}")
    if status.stages:
        lines.append("stages:")
    for stage in status.stages:
        state = _common().StageStatus.Name(stage.status).removeprefix("STAGE_STATUS_").lower()
        where = f"{stage.stage}/{stage.dataset}" if stage.dataset else stage.stage
        error = f"  {stage.last_error}" if stage.last_error else ""
        lines.append(f"  {where:<32} {state:<8} {stage.progress:>5.0%}{error}")
    for parked in status.parked:
        lines.append(
            f"parked {parked.stage} event {parked.event_id} after {parked.attempts} attempts: "
            f"{parked.error} (fix the cause, then `histoloop retry {status.project_id} {parked.stage}`)"
        )
    known = {
        "project_id",
        "round",
        "labelled_per_class",
        "n_labelled",
        "n_spots",
        "label_version",
        "latest_model_version",
        "latest_metrics",
        "stopping",
        "n_disputed",
        "pending_events",
        "stages",
        "parked",
        "n_parked",
        "notice",
    }
    for key, value in sorted(st.items()):  # per-stage state and whatever newer servers add
        if key not in known:
            lines.append(f"{key}: {json.dumps(value, sort_keys=True)}")
    return "\n".join(lines)


def _retry(args: argparse.Namespace, client: _Client) -> int:
    reply = client.call(
        "RetryStage",
        _pb().RetryStageRequest(
            project_id=args.project, stage=args.stage, dataset_id=args.dataset or ""
        ),
    )
    client.emit(_as_dict(reply), f"republished {reply.n_retried} parked {args.stage} event(s)")
    return EXIT_OK


def _status(args: argparse.Namespace, client: _Client) -> int:
    status = client.call("GetStatus", _pb().GetStatusRequest(project_id=args.project))
    client.emit(_as_dict(status), _status_text(status))
    return EXIT_OK


def _stream(client: _Client, project: str, include_latest: bool) -> Any:
    """The WatchQuerySets call: an iterator of query sets that can be cancelled."""
    rpc = client.stub.WatchQuerySets
    return rpc(_pb().WatchQuerySetsRequest(project_id=project, include_latest=include_latest))


def _watch(args: argparse.Namespace, client: _Client) -> int:
    from tqdm import tqdm

    pb = _pb()
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in _FORMATS]
    if bad:
        raise UsageError(f"--formats: {', '.join(bad)} not one of {', '.join(_FORMATS)}")
    client.call(
        "GetProject", pb.GetProjectRequest(project_id=args.project)
    )  # NOT_FOUND before waiting
    folder = Path(args.export) if args.export else None
    seen = 0
    bar = tqdm(
        total=args.rounds or None,
        desc=f"{args.project}: waiting for query sets",
        unit="query set",
        file=sys.stderr,
        disable=client.as_json,
    )
    stream = _stream(client, args.project, args.include_latest)
    try:
        for query_set in stream:
            if args.after_round is not None and query_set.round <= args.after_round:
                continue
            written: list[str] = []
            if folder is not None:
                datasets = args.dataset or sorted({s.dataset for s in query_set.spots if s.dataset})
                for dataset in datasets:
                    for fmt in formats:
                        kinds = ["queryset"] + (
                            ["predictions"] if query_set.model_version and fmt != "png" else []
                        )
                        for kind in kinds:
                            path, _n = _export_one(
                                client,
                                args.project,
                                dataset,
                                kind,
                                fmt,
                                query_set.queryset_id,
                                None,
                                folder / dataset,
                            )
                            written.append(str(path))
            summary = {
                "queryset_id": query_set.queryset_id,
                "round": query_set.round,
                "n_spots": len(query_set.spots),
                "model_version": query_set.model_version,
                "files": written,
            }
            if client.as_json:
                print(json.dumps(summary, sort_keys=True), flush=True)
            else:
                bar.write(
                    f"round {query_set.round}: {len(query_set.spots)} units asked "
                    f"({query_set.strategy}){'; wrote ' + ', '.join(written) if written else ''}"
                )
            bar.update(1)
            seen += 1
            if args.rounds and seen >= args.rounds:
                break
    finally:
        stream.cancel()
        bar.close()
    return EXIT_OK


def _agreement(args: argparse.Namespace, client: _Client) -> int:
    reply = client.call(
        "GetAgreement",
        _pb().GetAgreementRequest(project_id=args.project, dataset_id=args.dataset or ""),
    )
    lines = [
        f"Fleiss' kappa {reply.fleiss_kappa:.3f} over {reply.n_spots_multi_rated} units with several "
        f"annotators; {reply.n_disputed} disputed"
    ]
    lines += [
        f"  {p.annotator_a} vs {p.annotator_b}: Cohen's kappa {p.kappa:.3f} on {p.n_common} units"
        for p in reply.cohen
    ]
    lines += [
        f"  reliability {name}: {value:.3f}"
        for name, value in sorted(reply.annotator_reliability.items())
    ]
    client.emit(_as_dict(reply), "\n".join(lines))
    return EXIT_OK


# parser ------------------------------------------------------------------------------------
def _connection_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection")
    group.add_argument(
        "--server", help="host:port (default: 127.0.0.1:HISTOLOOP_GRPC_PORT, the local server)"
    )
    group.add_argument("--token", help="bearer token (default: HISTOLOOP_TOKEN)")
    group.add_argument(
        "--tls-ca", help="CA bundle to verify the server (default: HISTOLOOP_TLS_CA)"
    )
    group.add_argument(
        "--tls-cert", help="client certificate for mutual TLS (default: HISTOLOOP_TLS_CERT)"
    )
    group.add_argument("--tls-key", help="its private key (default: HISTOLOOP_TLS_KEY)")
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per call (default 60)")
    group.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return common


def add_commands(sub: Any) -> None:
    """Add the client commands to the ``histoloop`` parser's subcommands."""
    common = _connection_options()

    def leaf(
        parent: Any,
        name: str,
        handler: Callable[[argparse.Namespace, _Client], int],
        help_text: str,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help_text, parents=[common])
        parser.set_defaults(func=_run(handler))
        return parser

    project = sub.add_parser("project", help="create, show, list and configure projects")
    psub = project.add_subparsers(dest="project_command", required=True)
    p = leaf(psub, "create", _project_create, "create a project with its classes")
    p.add_argument("project", help="project id ([a-z0-9][a-z0-9-]*)")
    p.add_argument("--classes", required=True, help="class names, comma-separated")
    p.add_argument("--colors", help="#rrggbb per class, comma-separated (default: a palette)")
    p.add_argument("--name", help="display name")
    p.add_argument("--strategy", help="acquisition strategy (default: the server's)")
    p.add_argument("--features", help="morphology | expression | multimodal")
    p.add_argument("--query-size", type=int)
    p.add_argument("--head", help="mlp | multimodal | logreg | ensemble")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="any other LoopConfig setting"
    )
    p = leaf(psub, "show", _project_show, "a project's classes, datasets and settings")
    p.add_argument("project")
    leaf(psub, "list", _project_list, "the projects you can see")
    p = leaf(psub, "config", _project_config, "show settings, or change them with --set key=value")
    p.add_argument("project")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--reason", help="why (recorded in the project's history)")

    dataset = sub.add_parser("dataset", help="register, list and remove datasets")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True)
    p = leaf(dsub, "add", _dataset_add, "register a Visium sample or a whole-slide image")
    p.add_argument("project")
    p.add_argument("dataset")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--visium", metavar="SPATIAL_DIR", help="Space Ranger spatial/ folder")
    source.add_argument("--wsi", metavar="FILE", help="a whole-slide image (tiled on a grid)")
    p.add_argument("--slide", help="Visium: the H&E slide (full resolution)")
    p.add_argument("--counts", help="Visium: filtered_feature_bc_matrix.h5 or .h5ad")
    p.add_argument(
        "--slide-scale", type=float, help="Visium: slide px per Space Ranger full-res px"
    )
    p.add_argument("--tile-size", type=int, help="WSI: tile side in pixels (default 224)")
    p.add_argument(
        "--mpp", type=float, help="WSI: tile resolution µm/px (default: the slide's own)"
    )
    p.add_argument(
        "--wait",
        type=float,
        nargs="?",
        const=600.0,
        default=0.0,
        metavar="SECONDS",
        help="wait (progress bar) until the dataset is embedded and queried",
    )
    p = leaf(dsub, "list", _dataset_list, "a project's datasets")
    p.add_argument("project")
    p = leaf(
        dsub, "remove", _dataset_remove, "remove a dataset (its labels are kept in the history)"
    )
    p.add_argument("project")
    p.add_argument("dataset")
    p.add_argument("--reason", help="why (recorded)")

    annotator = sub.add_parser("annotator", help="annotators and their tokens")
    asub = annotator.add_subparsers(dest="annotator_command", required=True)
    p = leaf(asub, "add", _annotator_add, "register an annotator; prints the token once")
    p.add_argument("annotator", help="annotator id")
    p.add_argument("--role", choices=_ROLES, default="annotator")
    p.add_argument("--project", action="append", help="project membership (repeatable)")
    p.add_argument("--name", help="display name")

    labels = sub.add_parser("labels", help="import labels")
    lsub = labels.add_subparsers(dest="labels_command", required=True)
    p = leaf(
        lsub,
        "import",
        _labels_import,
        "import a Loupe .csv or a QuPath .geojson as one label batch",
    )
    p.add_argument("project")
    p.add_argument("dataset")
    p.add_argument("file")
    p.add_argument(
        "--annotator", help="record the labels as this annotator's (admin/service tokens)"
    )
    p.add_argument("--batch-id", help="default: derived from the file (re-importing it is a no-op)")
    p.add_argument("--queryset", help="the query set answered")
    p.add_argument(
        "--add-missing-classes", action="store_true", help="add unknown classes to the schema"
    )

    p = leaf(
        sub, "export", _export, "write a query set, predictions or labels (Loupe CSV, GeoJSON, PNG)"
    )
    p.add_argument("project")
    p.add_argument("dataset")
    p.add_argument("kind", choices=list(_KINDS))
    p.add_argument("--format", choices=list(_FORMATS), default="loupe")
    p.add_argument("-o", "--output", help="file or folder (default: ActiveVisium's file name here)")
    p.add_argument("--queryset", help="query set id (default: the latest)")
    p.add_argument(
        "--as",
        dest="as_annotator",
        metavar="ANNOTATOR",
        help="predictions: each unit's class as this annotator would label it (their own model)",
    )

    p = leaf(
        sub, "status", _status, "round, labels per class, model metrics, stopping signal, stages"
    )
    p.add_argument("project")
    p = leaf(sub, "retry", _retry, "re-run a stage's parked events once their cause is fixed")
    p.add_argument("project")
    p.add_argument("stage", choices=tuple(STAGE_OF_GROUP.values()))
    p.add_argument("--dataset", help="only this dataset's events")
    p = leaf(sub, "watch", _watch, "wait for each new query set and write its files")
    p.add_argument("project")
    p.add_argument(
        "--export", metavar="DIR", help="write each query set's files into DIR/<dataset>/"
    )
    p.add_argument("--formats", default="loupe", help="loupe,geojson,png (default loupe)")
    p.add_argument(
        "--dataset", action="append", help="only these datasets (default: those queried)"
    )
    p.add_argument("--include-latest", action="store_true", help="start with the current query set")
    p.add_argument("--after-round", type=int, help="skip query sets of this round and earlier")
    p.add_argument(
        "--rounds", type=int, default=0, help="stop after this many query sets (0: never)"
    )
    p = leaf(sub, "agreement", _agreement, "Cohen's and Fleiss' kappa, disputed units")
    p.add_argument("project")
    p.add_argument("--dataset")
