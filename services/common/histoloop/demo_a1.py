"""``histoloop demo --sample her2st-a1``: the loop on real H&E, from the image alone and with counts.

Section A1 of her2st (legacy Spatial Transcriptomics, 348 spots, one pathologist label per
spot). The six services start in this process (embedded backends); the demo is a gRPC
client that registers the section twice — the plain PNG as the slide, the legacy ST spot
file as positions (slide scale 2000/6954) — once in a project that learns from the image
alone (EfficientNet-Lite0 features, MLP head) and once in a project that adds the counts
(multimodal head: an image branch and a gene-expression branch). A simulated pathologist
answers each query set from the real labels; each round the predictions of every spot are
scored (macro-F1, balanced accuracy against the pathologist's labels).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, f1_score

from histoloop.config import load_settings
from histoloop.demo import _next_query_set, _predictions, _watch
from histoloop.her2st import A1_SLIDE_SCALE, HER2ST_CLASSES, load_a1, write_counts_h5ad
from histoloop.server import Server
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc, common_pb2

__all__ = ["A1Round", "MODES", "run_a1_demo"]

log = logging.getLogger(__name__)

MODES = {
    "image": ("mlp", common_pb2.FEATURE_SET_MORPHOLOGY),
    "image+counts": ("multimodal", common_pb2.FEATURE_SET_MULTIMODAL),
}
"""Demo mode → (head, feature set)."""
_COLOURS = ("#d62728", "#8c564b", "#ff7f0e", "#f1e05a", "#7f7f7f", "#1f77b4")
DATASET = "a1"


@dataclass(frozen=True)
class A1Round:
    """One round of one mode."""

    mode: str
    round: int
    labels: int
    macro_f1: float
    balanced_accuracy: float
    seconds_to_next_query: float


def _project(mode: str) -> str:
    return "her2st-a1-" + mode.replace("+", "-")


def run_a1_demo(
    data_dir: Path,
    out_dir: Path,
    *,
    modes: tuple[str, ...] = tuple(MODES),
    rounds: int = 8,
    query_size: int = 10,
    strategy: str = "activevisium",
    augment_views: int = 0,
    seed: int = 0,
    timeout: float = 900.0,
    on_round: Callable[[A1Round], None] = lambda r: None,
) -> list[A1Round]:
    """Run the loop on A1 for each mode; write ``a1_rounds.csv`` and ``a1_learning_curves.png``.

    Args:
        data_dir: the ``her2st/A1`` folder.
        out_dir: output folder (its ``state/`` is recreated).
        modes: keys of :data:`MODES`.
        rounds: label rounds after the cold start.
        query_size: spots per query set.
        strategy: acquisition strategy.
        augment_views: the projects' ``augment_views`` (embedding cost × (1 + views)).
        seed: the projects' seed.
        timeout: seconds to wait for each query set.
        on_round: called after each round.

    Raises:
        NotFound: a file of the section is missing.
        FailedPrecondition: a query set did not arrive in time (from :mod:`histoloop.demo`).
    """
    sample = load_a1(data_dir)
    truth = sample.labels
    state = out_dir / "state"
    shutil.rmtree(state, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = write_counts_h5ad(sample, out_dir / "a1_counts.h5ad", pad_missing=True)
    server = Server(load_settings(data_dir=state, grpc_port=0, metrics_port=0))
    server.start()
    results: list[A1Round] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = annotation_store_pb2_grpc.AnnotationStoreServiceStub(channel)
            for mode in modes:
                results += _run_mode(
                    stub,
                    channel,
                    mode,
                    sample,
                    counts,
                    truth,
                    rounds=rounds,
                    query_size=query_size,
                    strategy=strategy,
                    views=augment_views,
                    seed=seed,
                    timeout=timeout,
                    on_round=on_round,
                )
    finally:
        server.stop(5)
    pd.DataFrame([r.__dict__ for r in results]).to_csv(out_dir / "a1_rounds.csv", index=False)
    _plot(out_dir / "a1_learning_curves.png", results)
    return results


def _run_mode(
    stub,
    channel: grpc.Channel,
    mode: str,
    sample,
    counts: Path,
    truth: pd.Series,
    *,
    rounds: int,
    query_size: int,
    strategy: str,
    views: int,
    seed: int,
    timeout: float,
    on_round: Callable[[A1Round], None],
) -> list[A1Round]:
    head, features = MODES[mode]
    project = _project(mode)
    stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project,
            name=f"her2st A1 ({mode})",
            classes=[
                common_pb2.ClassDef(name=n, color=c)
                for n, c in zip(HER2ST_CLASSES, _COLOURS, strict=True)
            ],
            config=common_pb2.LoopConfig(
                strategy=strategy,
                cold_start_strategy="coldstart_kmeans",
                query_size=query_size,
                seed=seed,
                head=head,
                features=features,
                augment_views=views,
            ),
        )
    )
    arrivals, cancel = _watch(stub, project)
    stub.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=project,
            dataset_id=DATASET,
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(sample.selection),
            positions_format="legacy-st",
            slide_path=str(sample.image),
            slide_scale=A1_SLIDE_SCALE,
            expression_path=str(counts) if head == "multimodal" else "",
        )
    )
    query_set = _next_query_set(arrivals, -1, timeout)
    rows: list[A1Round] = []
    n_labels = 0
    try:
        for _ in range(rounds):
            answers = [
                pb.SpotLabel(barcode=s.barcode, label=truth[s.barcode]) for s in query_set.spots
            ]
            n_labels += len(answers)
            started = time.perf_counter()
            stub.SubmitLabels(
                pb.SubmitLabelsRequest(
                    project_id=project,
                    dataset_id=DATASET,
                    batch_id=f"a1-{mode}-{query_set.round}",
                    labels=answers,
                    queryset_id=query_set.queryset_id,
                )
            )
            query_set = _next_query_set(arrivals, query_set.round, timeout)
            latency = time.perf_counter() - started
            predicted = _predictions(channel, project, DATASET).reindex(truth.index)
            row = A1Round(
                mode=mode,
                round=query_set.round,
                labels=n_labels,
                macro_f1=float(
                    f1_score(
                        truth,
                        predicted,
                        average="macro",
                        labels=sorted(set(truth)),
                        zero_division=0,
                    )
                ),
                balanced_accuracy=float(balanced_accuracy_score(truth, predicted)),
                seconds_to_next_query=latency,
            )
            rows.append(row)
            on_round(row)
    finally:
        cancel()
    return rows


def _plot(path: Path, results: list[A1Round]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for mode in dict.fromkeys(r.mode for r in results):
        rows = [r for r in results if r.mode == mode]
        ax.plot(
            [r.labels for r in rows], [r.macro_f1 for r in rows], "o-", label=f"{mode}: macro-F1"
        )
    ax.set_xlabel("labelled spots")
    ax.set_ylabel("macro-F1 on all 348 spots")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("her2st A1: image alone vs image + counts")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
