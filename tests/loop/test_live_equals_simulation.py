"""A simulated campaign arm is the live loop: same labels and seed, same model, same query sets.

The live embedded loop runs a DLPFC project (every spot labelled, so the simulated oracle
and the pathologist answer the same) through the cold start and one round; a campaign arm
then replays it on the same embeddings, with the live loop's whole pool. Both go through
``fit_round`` and ``select_query``; the test checks the outcome spot for spot.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from histoloop.datasets import feature_matrix, read_anndata, read_predictions
from histoloop.formats.embeddings import OBSM_EXPR, embeddings_prefix
from histoloop.formats.vocab import DEFAULT_SPATIAL_NEIGHBOURS
from histoloop.models import list_cards
from histoloop.simulation import _engine as engine
from histoloop.training.evaluate import classification_metrics
from histoloop.training.scaling import FeatureScaling
from histoloop.v1 import (
    acquisition_pb2,
    acquisition_pb2_grpc,
    common_pb2,
    embedding_pb2,
    embedding_pb2_grpc,
)
from histoloop.v1 import annotation_store_pb2 as pb
from tests.loop.conftest import LAYERS, Watch, answer

pytestmark = pytest.mark.slow

PROJECT, SEED, QUERY_SIZE = "live-sim", 7, 12


def _labelled_only(folder: Path, truth, into: Path) -> Path:
    """The sample's spatial/ folder with only the spots the annotation covers."""
    spatial = into / "spatial"
    shutil.copytree(folder / "spatial", spatial)
    lines = (spatial / "tissue_positions_list.csv").read_text().splitlines()
    kept = [line for line in lines if line.split(",", 1)[0] in truth.index]
    (spatial / "tissue_positions_list.csv").write_text("\n".join(kept) + "\n")
    return spatial


def _live_rounds(
    server,
    store,
    dlpfc,
    tmp_path: Path,
    project: str,
    strategy: str,
    size: int,
    settings: common_pb2.LoopConfig | None = None,
) -> tuple:
    """Cold start and two rounds of a live DLPFC project (logreg, ``strategy``, ``settings``).

    Returns its query sets, its embeddings' URI and AnnData, and the same pool to simulate.
    """
    folder, truth = dlpfc
    config = common_pb2.LoopConfig(
        features=common_pb2.FEATURE_SET_EXPRESSION,
        query_size=size,
        head="logreg",
        strategy=strategy,
        seed=SEED,
    )
    if settings is not None:
        config.MergeFrom(settings)
    store.CreateProject(
        pb.CreateProjectRequest(
            project_id=project,
            name=project,
            classes=[common_pb2.ClassDef(name=n) for n in LAYERS],
            config=config,
        )
    )
    watch = Watch(store, project)
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=project,
            dataset_id="151510",
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(_labelled_only(folder, truth, tmp_path)),
            expression_path=str(folder / "dlpfc151510_500genes.h5ad"),
        )
    )
    live = [watch.next_round(-1)]
    for round_ in range(2):  # the second model starts warm from the first
        store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=project,
                dataset_id="151510",
                batch_id=f"b{round_ + 1}",
                labels=answer(live[-1], truth),
            )
        )
        live.append(watch.next_round(round_))
    watch.close()
    artifacts = server.runtime.store
    [embeddings] = [
        i.key for i in artifacts.list(embeddings_prefix(project)) if i.key.endswith(".h5ad")
    ]
    adata = read_anndata(artifacts, artifacts.uri(embeddings))
    # the same pool simulated, the oracle answering from the same truth, with the project's
    # features (the default 6 nearest spots' mean beside each spot's own)
    X = feature_matrix(adata, common_pb2.FEATURE_SET_EXPRESSION, DEFAULT_SPATIAL_NEIGHBOURS).astype(
        np.float32
    )
    barcodes = np.asarray(adata.obs_names, dtype=str)
    y = np.searchsorted(np.asarray(LAYERS), truth[barcodes].to_numpy()).astype(np.int64)
    every = np.arange(len(y), dtype=np.int64)
    problem = engine.Problem(
        X=X,
        y=y,
        classes=tuple(LAYERS),
        splits={SEED: (every, every)},
        scaling=FeatureScaling.fit(X),
        positions=adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64),
    )
    return live, artifacts.uri(embeddings), adata, problem


def _arm(strategy: str, size: int, settings: str = "") -> engine.RunSpec:
    """The live project's arm: logreg, k-means cold start, warm start, three rounds of ``size``."""
    return engine.RunSpec(
        head="logreg",
        strategy=strategy,
        seed=SEED,
        targets=(size, 2 * size, 3 * size),
        initial="coldstart_kmeans",
        initial_size=size,
        warm_start=True,
        hyperparameters=(),
        settings=settings,
    )


def test_a_campaign_arm_picks_what_the_live_loop_picks(
    server, store, channel, dlpfc, tmp_path: Path
) -> None:
    (cold, first, second), uri, adata, problem = _live_rounds(
        server, store, dlpfc, tmp_path, PROJECT, "activevisium", QUERY_SIZE
    )
    artifacts = server.runtime.store
    cards = [card for _, card in list_cards(artifacts, PROJECT)]
    embedded = embedding_pb2_grpc.EmbeddingServiceStub(channel).EmbedDataset(
        embedding_pb2.EmbedDatasetRequest(project_id=PROJECT, dataset_id="151510")
    )
    assert (embedded.embeddings_uri, embedded.n_spots) == (uri, adata.n_obs)
    assert embedded.dim == adata.obsm[OBSM_EXPR].shape[1] > 0
    barcodes, y = np.asarray(adata.obs_names, dtype=str), problem.y

    spec = _arm("activevisium", QUERY_SIZE)
    assert engine.run(problem, spec, tmp_path / "campaign") == 3
    records = engine.read_records(engine.run_path(tmp_path / "campaign", spec))

    assert len(cards) == 2
    for query_set, record in zip((cold, first, second), records, strict=True):
        assert [s.barcode for s in query_set.spots] == barcodes[record["picked"]].tolist()
    predictions = sorted(
        i.key for i in artifacts.list(f"predictions/{PROJECT}/") if i.key.endswith(".npz")
    )
    for card, record in zip(
        cards, records, strict=False
    ):  # each model: its own metrics, and on every spot
        assert record["validation"] == {m: card.metrics.get(m) for m in engine.METRICS}
        live = read_predictions(
            artifacts, artifacts.uri(next(k for k in predictions if card.version in k))
        )
        assert live.barcodes.tolist() == barcodes.tolist()
        on_every_spot = classification_metrics(y, live.probabilities.argmax(axis=1), classes=LAYERS)
        for name in engine.METRICS:
            assert record[name] == pytest.approx(on_every_spot[name], abs=1e-9), name
    # a validation split exactly when every class labelled so far has two labels or more
    for n_rounds, record in enumerate(records[1:], start=2):
        labelled = np.concatenate([np.asarray(r["picked"]) for r in records[:n_rounds]])
        counts = np.bincount(y[labelled])
        splits = bool((counts[counts > 0] >= 2).all())
        assert any(v is not None for v in record["validation"].values()) == splits, n_rounds

    # the Query RPC asks with the project's stored config; a request overrides it explicitly
    acquisition = acquisition_pb2_grpc.AcquisitionServiceStub(channel)
    what_if = acquisition.Query(acquisition_pb2.QueryRequest(project_id=PROJECT))
    assert what_if.strategy == "activevisium" and len(what_if.spots) == QUERY_SIZE
    asked = {s.barcode for q in (cold, first) for s in q.spots}
    assert not asked & {s.barcode for s in what_if.spots}
    again = acquisition.Query(acquisition_pb2.QueryRequest(project_id=PROJECT))
    assert [s.barcode for s in again.spots] == [s.barcode for s in what_if.spots]
    other = acquisition.Query(
        acquisition_pb2.QueryRequest(project_id=PROJECT, strategy="margin", query_size=5)
    )
    assert other.strategy == "margin" and len(other.spots) == 5


def test_loop_settings_reach_a_campaign_arm(server, store, dlpfc, tmp_path: Path) -> None:
    """A project's non-default strategy and stopping settings: the same picks and signal simulated."""
    project, size = "live-sim-settings", 10
    settings = common_pb2.LoopConfig(
        hybrid_share=0.3, stop_max_change=0.9, stop_min_kappa=0.05, stop_patience=1
    )
    live, _, adata, problem = _live_rounds(
        server, store, dlpfc, tmp_path, project, "hybrid", size, settings
    )
    barcodes = np.asarray(adata.obs_names, dtype=str)

    def simulated(loop: common_pb2.LoopConfig, folder: Path) -> list[dict]:
        spec = _arm("hybrid", size, engine.settings_json(loop))
        assert engine.run(problem, spec, folder) == 3
        return engine.read_records(engine.run_path(folder, spec))

    records = simulated(settings, tmp_path / "settings")
    for query_set, record in zip(live, records, strict=True):
        assert [s.barcode for s in query_set.spots] == barcodes[record["picked"]].tolist()
    # the loose stopping thresholds fire on the first two models in both (round 1's record
    # holds the signal of models 1 and 2, which the live loop sends with the next query set)
    assert live[2].stopping.recommend_stop and records[1]["stop"]
    assert records[1]["changed_fraction"] == pytest.approx(live[2].stopping.changed_fraction)
    # and they matter: with the defaults the arm picks otherwise from the same first model
    # (hybrid share 0.7) and does not stop yet (patience 2)
    defaults = simulated(common_pb2.LoopConfig(), tmp_path / "defaults")
    assert defaults[0]["picked"] == records[0]["picked"]
    assert defaults[1]["picked"] != records[1]["picked"] and not defaults[1]["stop"]
