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


def test_a_campaign_arm_picks_what_the_live_loop_picks(
    server, store, channel, dlpfc, tmp_path: Path
) -> None:
    folder, truth = dlpfc
    store.CreateProject(
        pb.CreateProjectRequest(
            project_id=PROJECT,
            name=PROJECT,
            classes=[common_pb2.ClassDef(name=n) for n in LAYERS],
            config=common_pb2.LoopConfig(
                features=common_pb2.FEATURE_SET_EXPRESSION,
                query_size=QUERY_SIZE,
                head="logreg",
                strategy="activevisium",
                seed=SEED,
            ),
        )
    )
    watch = Watch(store, PROJECT)
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=PROJECT,
            dataset_id="151510",
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(_labelled_only(folder, truth, tmp_path)),
            expression_path=str(folder / "dlpfc151510_500genes.h5ad"),
        )
    )
    cold = watch.next_round(-1)
    store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=PROJECT, dataset_id="151510", batch_id="b1", labels=answer(cold, truth)
        )
    )
    first = watch.next_round(0)
    store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id=PROJECT, dataset_id="151510", batch_id="b2", labels=answer(first, truth)
        )
    )
    second = watch.next_round(1)  # the second model starts warm from the first
    watch.close()
    artifacts = server.runtime.store
    cards = [card for _, card in list_cards(artifacts, PROJECT)]
    [embeddings] = [
        i.key for i in artifacts.list(embeddings_prefix(PROJECT)) if i.key.endswith(".h5ad")
    ]
    adata = read_anndata(artifacts, artifacts.uri(embeddings))

    embedded = embedding_pb2_grpc.EmbeddingServiceStub(channel).EmbedDataset(
        embedding_pb2.EmbedDatasetRequest(project_id=PROJECT, dataset_id="151510")
    )
    assert (embedded.embeddings_uri, embedded.n_spots) == (artifacts.uri(embeddings), adata.n_obs)
    assert embedded.dim == adata.obsm[OBSM_EXPR].shape[1] > 0

    # the same campaign arm, simulated: the live pool, the oracle answering from the same truth
    # the project's features (the default 6 nearest spots' mean beside each spot's own)
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
    spec = engine.RunSpec(
        head="logreg",
        strategy="activevisium",
        seed=SEED,
        targets=(QUERY_SIZE, 2 * QUERY_SIZE, 3 * QUERY_SIZE),
        initial="coldstart_kmeans",
        initial_size=QUERY_SIZE,
        warm_start=True,
        hyperparameters=(),
    )
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
