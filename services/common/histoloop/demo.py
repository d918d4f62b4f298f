"""The main job: the whole loop on DLPFC 151510, a simulated pathologist answering over gRPC.

``histoloop demo`` starts the six services in this process (embedded backends, a fresh
state folder), then acts only as a gRPC client: it creates a project, registers the
sample (Space Ranger positions + gene-expression counts), waits for the cold-start query
set, answers each query set from the sample's manual layer annotation through
``SubmitLabels`` and waits for the next query set, which the services produce on their
own. Each round it measures macro-F1 and balanced accuracy of the predictions on all
spots and the time from labels submitted to the next query set.
"""

from __future__ import annotations

import csv
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score

from histoloop.config import load_settings
from histoloop.errors import FailedPrecondition, NotFound
from histoloop.server import Server
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import (
    annotation_store_pb2_grpc,
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
    prediction_pb2,
    prediction_pb2_grpc,
)

__all__ = ["DemoRound", "run_demo"]

log = logging.getLogger(__name__)

LAYER_COLOURS = {
    "Layer1": "#f0e442",
    "Layer2": "#e69f00",
    "Layer3": "#56b4e9",
    "Layer4": "#009e73",
    "Layer5": "#0072b2",
    "Layer6": "#d55e00",
    "WM": "#7f7f7f",
}
PROJECT = "dlpfc-demo"
DATASET = "151510"


@dataclass(frozen=True)
class DemoRound:
    """One round's numbers, as printed in the table."""

    round: int
    labels: int
    macro_f1: float
    balanced_accuracy: float
    seconds_to_next_query: float
    model_version: str


def _watch(
    stub: annotation_store_pb2_grpc.AnnotationStoreServiceStub, project: str = PROJECT
) -> tuple[queue.Queue, Callable[[], None]]:
    """Query sets as they arrive, from the server-streaming WatchQuerySets."""
    arrivals: queue.Queue = queue.Queue()
    stream = stub.WatchQuerySets(pb.WatchQuerySetsRequest(project_id=project, include_latest=True))

    def pump() -> None:
        try:
            for query_set in stream:
                arrivals.put(query_set)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                arrivals.put(exc)

    threading.Thread(target=pump, name="watch", daemon=True).start()
    return arrivals, stream.cancel


def _next_query_set(arrivals: queue.Queue, after_round: int, timeout: float) -> pb.QuerySet:
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FailedPrecondition(
                f"no query set after round {after_round} within {timeout:.0f}s"
            )
        item = arrivals.get(timeout=remaining)
        if isinstance(item, Exception):
            raise item
        if item.round > after_round:
            return item


def _predictions(
    channel: grpc.Channel, project: str = PROJECT, dataset: str = DATASET
) -> pd.Series:
    """The latest model's predicted class of every spot, via the Embedding and Prediction services."""
    embeddings = embedding_pb2_grpc.EmbeddingServiceStub(channel).EmbedDataset(
        embedding_pb2.EmbedDatasetRequest(project_id=project, dataset_id=dataset)
    )
    reply = prediction_pb2_grpc.PredictionServiceStub(channel).Predict(
        prediction_pb2.PredictRequest(project_id=project, embeddings_uri=embeddings.embeddings_uri)
    )
    return pd.Series(list(reply.predicted), index=list(reply.barcodes))


def run_demo(
    data_dir: Path,
    out_dir: Path,
    *,
    rounds: int = 10,
    query_size: int = 20,
    strategy: str = "activevisium",
    head: str = "mlp",
    spatial_neighbours: int = 6,
    seed: int = 0,
    timeout: float = 300.0,
    on_round: Callable[[DemoRound], None] = lambda r: None,
    on_workspace: Callable[[str], None] | None = None,
    hold: Callable[[], None] = lambda: None,
) -> list[DemoRound]:
    """Run the loop; write Loupe CSVs and PNGs into ``out_dir``; return one row per round.

    With ``on_workspace`` the browser workspace is served too (``HISTOLOOP_WEB_PORT``, else
    a free port) and called with its URL, the demo project open; ``hold`` runs after the
    outputs are written, before the services stop (``histoloop demo --serve`` waits there).
    """
    h5ad = data_dir / "dlpfc151510_500genes.h5ad"
    spatial = data_dir / "spatial"
    if not h5ad.is_file() or not spatial.is_dir():
        raise NotFound(f"DLPFC 151510 not found under {data_dir} (need {h5ad.name} and spatial/)")
    import anndata as ad

    truth = ad.read_h5ad(h5ad).obs["layer"].astype("object")
    truth = truth[truth.notna()].astype(str)
    state = out_dir / "state"
    shutil.rmtree(state, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = load_settings(
        data_dir=state,
        grpc_port=0,
        metrics_port=0,
        **({} if "HISTOLOOP_WEB_PORT" in os.environ else {"web_port": 0}),
    )
    server = Server(settings)
    if on_workspace is not None:
        from histoloop.web import WorkspaceCompanion

        server.companions.append(
            WorkspaceCompanion(
                server, settings, on_ready=lambda url: on_workspace(f"{url}?project={PROJECT}")
            )
        )
    server.start()
    results: list[DemoRound] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = annotation_store_pb2_grpc.AnnotationStoreServiceStub(channel)
            stub.CreateProject(
                pb.CreateProjectRequest(
                    project_id=PROJECT,
                    name="DLPFC 151510 cortical layers",
                    classes=[
                        common_pb2.ClassDef(name=n, color=c) for n, c in LAYER_COLOURS.items()
                    ],
                    config=common_pb2.LoopConfig(
                        strategy=strategy,
                        cold_start_strategy="coldstart_kmeans",
                        query_size=query_size,
                        seed=seed,
                        head=head,
                        features=common_pb2.FEATURE_SET_EXPRESSION,
                        spatial_neighbours=spatial_neighbours,
                    ),
                )
            )
            arrivals, cancel = _watch(stub)
            stub.RegisterDataset(
                pb.RegisterDatasetRequest(
                    project_id=PROJECT,
                    dataset_id=DATASET,
                    kind=common_pb2.DATASET_KIND_VISIUM,
                    spatial_dir=str(spatial),
                    expression_path=str(h5ad),
                )
            )
            query_set = _next_query_set(arrivals, -1, timeout)
            n_labels = 0
            for _ in _rounds(rounds):
                answers = [
                    pb.SpotLabel(barcode=s.barcode, label=truth[s.barcode])
                    for s in query_set.spots
                    if s.barcode in truth.index
                ]
                n_labels += len(answers)
                started = time.perf_counter()
                stub.SubmitLabels(
                    pb.SubmitLabelsRequest(
                        project_id=PROJECT,
                        dataset_id=DATASET,
                        batch_id=f"demo-round-{query_set.round}",
                        labels=answers,
                        queryset_id=query_set.queryset_id,
                    )
                )
                query_set = _next_query_set(arrivals, query_set.round, timeout)
                latency = time.perf_counter() - started
                predicted = _predictions(channel).reindex(truth.index)
                row = DemoRound(
                    round=query_set.round,
                    labels=n_labels,
                    macro_f1=float(
                        f1_score(truth, predicted, average="macro", labels=sorted(LAYER_COLOURS))
                    ),
                    balanced_accuracy=float(balanced_accuracy_score(truth, predicted)),
                    seconds_to_next_query=latency,
                    model_version=query_set.model_version,
                )
                results.append(row)
                on_round(row)
            _write_outputs(stub, channel, out_dir, results, data_dir, truth)
            cancel()
            hold()
    finally:
        server.stop(5)
    return results


def _rounds(n: int) -> Iterator[int]:
    yield from range(1, n + 1)


def _write_outputs(
    stub,
    channel: grpc.Channel,
    out_dir: Path,
    results: list[DemoRound],
    data_dir: Path,
    truth: pd.Series,
) -> None:
    for kind, name in (
        (pb.EXPORT_KIND_QUERY_SET, "loupe_query_set.csv"),
        (pb.EXPORT_KIND_PREDICTIONS, "loupe_predictions.csv"),
        (pb.EXPORT_KIND_LABELS, "loupe_labels.csv"),
    ):
        reply = stub.ExportLabels(
            pb.ExportLabelsRequest(project_id=PROJECT, dataset_id=DATASET, kind=kind)
        )
        (out_dir / name).write_bytes(reply.csv)
    _learning_curve(out_dir / "learning_curve.png", results)
    _prediction_map(out_dir / "prediction_map.png", _predictions(channel), truth, data_dir)
    with open(out_dir / "rounds.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["round", "labels", "macro_f1", "balanced_accuracy", "seconds_to_next_query"]
        )
        for r in results:
            writer.writerow(
                [
                    r.round,
                    r.labels,
                    f"{r.macro_f1:.4f}",
                    f"{r.balanced_accuracy:.4f}",
                    f"{r.seconds_to_next_query:.3f}",
                ]
            )


def _learning_curve(path: Path, results: list[DemoRound]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    labels = [r.labels for r in results]
    ax.plot(labels, [r.macro_f1 for r in results], "o-", label="macro-F1")
    ax.plot(labels, [r.balanced_accuracy for r in results], "s-", label="balanced accuracy")
    ax.set_xlabel("labelled spots")
    ax.set_ylabel("score on all spots")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("DLPFC 151510: active-learning curve")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _prediction_map(path: Path, predicted: pd.Series, truth: pd.Series, data_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import json

    import matplotlib.pyplot as plt
    from PIL import Image

    spatial = data_dir / "spatial"
    scale = json.loads((spatial / "scalefactors_json.json").read_text())["tissue_lowres_scalef"]
    positions = pd.read_csv(
        spatial / "tissue_positions_list.csv",
        header=None,
        names=["barcode", "in_tissue", "row", "col", "pxl_row", "pxl_col"],
    ).set_index("barcode")
    image = np.asarray(Image.open(spatial / "tissue_lowres_image.png").convert("RGB"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5), dpi=120)
    for ax, (title, labels) in zip(
        axes, (("predicted", predicted), ("pathologist (ground truth)", truth)), strict=True
    ):
        ax.imshow(image)
        spots = positions.loc[positions.index.intersection(labels.index)]
        colours = [LAYER_COLOURS.get(str(labels[b]), "#000000") for b in spots.index]
        ax.scatter(spots.pxl_col * scale, spots.pxl_row * scale, c=colours, s=6, linewidths=0)
        ax.set_title(title)
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=n) for n, c in LAYER_COLOURS.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)
