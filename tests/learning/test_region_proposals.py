"""propose_clicked_region on a WSI tile grid: 8-neighbour regions, units matched by id, errors, and the
region as one annotator's model draws it."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from histoloop.artifacts.local import LocalArtifactStore
from histoloop.datasets import Predictions, write_anndata, write_predictions
from histoloop.errors import FailedPrecondition, InvalidArgument, NotFound
from histoloop.formats.embeddings import embeddings_key
from histoloop.models import ModelCard, latest_card, save_model
from histoloop.prediction.proposals import predictions_key, propose_clicked_region

CLASSES = ["stroma", "tumour"]
TUMOUR = {(0, 0), (1, 1), (2, 2), (4, 0)}  # a diagonal chain, and one tile apart from it


def _card(**fields) -> ModelCard:
    return ModelCard(
        **{
            "project": "p",
            "version": "v1",
            "head": "logreg",
            "classes": CLASSES,
            "input_dim": 2,
            "features": 0,
            "spatial_neighbours": 0,
            "seed": 0,
            "label_version": 1,
            "label_batch_ids": ["b"],
            "embeddings_uris": [],
            "hyperparameters": {},
            "metrics": {},
            "train_seconds": 0.0,
            "created_ms": 1,
            **fields,
        }
    )


@pytest.fixture
def store(tmp_path) -> LocalArtifactStore:
    store = LocalArtifactStore(tmp_path)
    cells = [(r, c) for r in range(5) for c in range(5)]
    obs = pd.DataFrame(
        {"grid_row": [r for r, _ in cells], "grid_col": [c for _, c in cells]},
        index=[f"r{r}_c{c}" for r, c in cells],
    )
    uri = write_anndata(
        store,
        embeddings_key("p", "slide", "e1"),
        ad.AnnData(obs=obs, obsm={"X_morph": np.zeros((len(cells), 2), np.float32)}),
    )
    order = np.random.default_rng(0).permutation(
        len(cells)
    )  # predictions in another order than the embeddings
    probabilities = np.array(
        [[0.1, 0.9] if cells[i] in TUMOUR else [0.8, 0.2] for i in order], np.float32
    )
    save_model(store, _card(embeddings_uris=[uri]), torch.jit.script(torch.nn.Identity()))
    write_predictions(
        store,
        predictions_key("p", "v1"),
        Predictions(
            model_version="v1",
            classes=CLASSES,
            datasets=np.full(len(cells), "slide"),
            barcodes=np.array([f"r{cells[i][0]}_c{cells[i][1]}" for i in order]),
            probabilities=probabilities,
            hidden=np.zeros((len(cells), 1), np.float32),
        ),
    )
    return store


def test_tiles_connect_through_their_diagonals(store) -> None:
    region = propose_clicked_region(store, "p", "slide", "r0_c0")
    assert list(region.units) == ["r0_c0", "r1_c1", "r2_c2"]
    assert region.class_name == "tumour" and region.model_version == "v1"
    assert list(propose_clicked_region(store, "p", "slide", "r4_c0").units) == ["r4_c0"]
    stroma = propose_clicked_region(store, "p", "slide", "r0_c1", max_units=4)
    assert stroma.units[0] == "r0_c1" and len(stroma.units) == 4 and stroma.class_name == "stroma"


@pytest.mark.parametrize(
    ("args", "error", "field"),
    [
        (("q", "slide", "r0_c0"), NotFound, "project_id"),
        (("p", "other", "r0_c0"), NotFound, "dataset_id"),
        (("p", "slide", "r9_c9"), NotFound, "unit"),
    ],
)
def test_unknown_names_name_their_field(store, args, error, field) -> None:
    with pytest.raises(error, match=field):
        propose_clicked_region(store, *args)
    with pytest.raises(NotFound, match="model_version"):
        propose_clicked_region(store, "p", "slide", "r0_c0", model_version="v9")


def test_before_predictions_is_a_failed_precondition(store) -> None:
    write_anndata(
        store,
        embeddings_key("fresh", "slide", "e1"),
        ad.AnnData(
            obs=pd.DataFrame(index=["r0_c0"]), obsm={"X_morph": np.zeros((1, 2), np.float32)}
        ),
    )
    with pytest.raises(FailedPrecondition, match="no predictions yet"):
        propose_clicked_region(store, "fresh", "slide", "r0_c0")
    newer = _card(version="v2", created_ms=2)  # trained, not yet predicted
    save_model(store, newer, torch.jit.script(torch.nn.Identity()))
    with pytest.raises(FailedPrecondition, match="no predictions yet"):
        propose_clicked_region(store, "p", "slide", "r0_c0")
    assert (
        propose_clicked_region(store, "p", "slide", "r0_c0", model_version="v1").model_version
        == "v1"
    )


def test_the_region_as_an_annotator_would_draw_it(store) -> None:
    with pytest.raises(FailedPrecondition, match="per-annotator"):  # v1 has no per-annotator model
        propose_clicked_region(store, "p", "slide", "r0_c0", annotator="ann")
    cells = [(r, c) for r in range(5) for c in range(5)]
    bob = TUMOUR | {(3, 3)}  # bob's model carries the chain one tile further
    rater_predicted = np.array(
        [[int(cell in TUMOUR) for cell in cells], [int(cell in bob) for cell in cells]]
    )
    uris = list(latest_card(store, "p")[1].embeddings_uris)
    save_model(
        store,
        _card(version="v2", created_ms=2, embeddings_uris=uris, raters=["ann", "bob"]),
        torch.jit.script(torch.nn.Identity()),
        torch.jit.script(torch.nn.Identity()),
    )
    write_predictions(
        store,
        predictions_key("p", "v2"),
        Predictions(
            model_version="v2",
            classes=CLASSES,
            datasets=np.full(len(cells), "slide"),
            barcodes=np.array([f"r{r}_c{c}" for r, c in cells]),
            probabilities=np.tile([0.8, 0.2], (len(cells), 1)),
            hidden=np.zeros((len(cells), 1), np.float32),
            raters=["ann", "bob"],
            rater_predicted=rater_predicted,
        ),
    )
    consensus = propose_clicked_region(store, "p", "slide", "r0_c0")
    assert (
        consensus.class_name == "stroma" and len(consensus.units) > 1
    )  # the consensus model: all stroma
    ann = propose_clicked_region(store, "p", "slide", "r0_c0", annotator="ann")
    as_bob = propose_clicked_region(store, "p", "slide", "r0_c0", annotator="bob")
    assert list(ann.units) == ["r0_c0", "r1_c1", "r2_c2"] and ann.class_name == "tumour"
    assert (
        list(as_bob.units) == ["r0_c0", "r1_c1", "r2_c2", "r3_c3"] and as_bob.model_version == "v2"
    )
    with pytest.raises(NotFound, match="annotator_id"):
        propose_clicked_region(store, "p", "slide", "r0_c0", annotator="eve")


def test_a_card_lists_raters_exactly_when_a_per_annotator_module_is_saved(tmp_path) -> None:
    store = LocalArtifactStore(tmp_path / "registry")
    module = torch.jit.script(torch.nn.Identity())
    with pytest.raises(InvalidArgument, match="raters"):
        save_model(store, _card(raters=["ann", "bob"]), module)
    with pytest.raises(InvalidArgument, match="raters"):
        save_model(store, _card(), module, module)
    assert list(store.list("models/")) == []
