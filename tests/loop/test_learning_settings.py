"""Issue 16 settings in the live loop: the bandit's state persists between rounds, label
spreading adds pseudo-labels to training, and the ActiveVisium preset fills in the paper's loop."""

from __future__ import annotations

import json

import grpc
import pytest

from histoloop.models import list_cards
from histoloop.presets import PRESETS
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import common_pb2

from .conftest import answer, start_project


def test_bandit_state_carries_over_and_pseudo_labels_join_training(server, store, dlpfc) -> None:
    folder, truth = dlpfc
    project = "learn-bandit"
    watch = start_project(
        store,
        folder,
        project,
        query_size=12,
        head="logreg",
        seed=3,
        strategy="bandit",
        semi_supervised=0.9,
    )
    query_set = watch.next_round(-1)
    labelled = 0
    for batch in range(3):
        answers = answer(query_set, truth)
        labelled += len(answers)
        store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=project,
                dataset_id="151510",
                batch_id=f"b{batch}",
                labels=answers,
                queryset_id=query_set.queryset_id,
            )
        )
        query_set = watch.next_round(query_set.round)
    watch.close()
    artifacts = server.runtime.store
    records = sorted(
        (
            json.loads(artifacts.get(i.key))
            for i in artifacts.list(f"querysets/{project}/")
            if i.key.endswith(".json")
        ),
        key=lambda r: r["round"],
    )
    states = [r["strategy_state"] for r in records if r["strategy"] == "bandit"]
    assert len(states) == 3 and all(s["arms"] == states[0]["arms"] for s in states)
    assert [sum(s["plays"]) for s in states] == [
        1,
        2,
        3,
    ]  # each round continues the last one's state
    assert states[-1]["rewards"], (
        "the random share of round 1 was labelled and paid a reward by round 3"
    )
    cards = [card for _, card in list_cards(artifacts, project)]
    trained = [int(c.extra["n_train"]) + int(c.extra["n_validation"]) for c in cards]
    # ≤ 12 labels per batch: more spots than that means pseudo-labelled spots trained beside the labels
    assert any(n > 12 * c.label_version for n, c in zip(trained, cards, strict=True)), trained
    assert labelled <= 36


def test_activevisium_preset_and_bad_settings(store) -> None:
    classes = [common_pb2.ClassDef(name="a"), common_pb2.ClassDef(name="b")]
    project = store.CreateProject(
        pb.CreateProjectRequest(
            project_id="learn-preset",
            name="x",
            classes=classes,
            config=common_pb2.LoopConfig(preset="activevisium"),
        )
    )
    loop = PRESETS["activevisium"]["loop"]
    got = project.config
    assert (got.preset, got.strategy, got.head, got.query_size, got.spatial_neighbours) == (
        "activevisium",
        loop["strategy"],
        loop["head"],
        loop["query_size"],
        loop["spatial_neighbours"],
    )
    for config, field in (
        (common_pb2.LoopConfig(preset="nope"), "config.preset"),
        (common_pb2.LoopConfig(semi_supervised=1.5), "config.semi_supervised"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            store.CreateProject(
                pb.CreateProjectRequest(
                    project_id="learn-bad", name="x", classes=classes, config=config
                )
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
