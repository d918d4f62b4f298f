"""The automatic loop in the embedded default: one SubmitLabels → a new query set, alone."""

from __future__ import annotations

import sqlite3
import time

import grpc
import pytest

from histoloop import events
from histoloop.server import Server
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import training_pb2, training_pb2_grpc
from histoloop.worker import EventWorker
from tests.loop.conftest import answer, start_project


def _topics_after(server: Server, project: str, first_seq: int) -> list[tuple[int, str]]:
    """(sequence, topic) of a project's events in the embedded log after ``first_seq``."""
    with sqlite3.connect(server.settings.data_dir / "events.sqlite") as db:
        return db.execute(
            "SELECT seq, topic FROM events WHERE key = ? AND seq > ? ORDER BY seq",
            (project, first_seq),
        ).fetchall()


def test_submit_labels_alone_yields_the_next_query_set(server, store, dlpfc) -> None:
    folder, truth = dlpfc
    watch = start_project(
        store, folder, "loop-a", query_size=12, head="logreg", strategy="activevisium", seed=3
    )
    cold = watch.next_round(-1)
    assert cold.round == 0 and len(cold.spots) == 12
    assert {s.reason for s in cold.spots} == {"cold_start"}
    assert len({s.barcode for s in cold.spots}) == 12

    before = _topics_after(server, "loop-a", 0)[-1][0]
    reply = store.SubmitLabels(
        pb.SubmitLabelsRequest(
            project_id="loop-a", dataset_id="151510", batch_id="b1", labels=answer(cold, truth)
        )
    )
    assert reply.n_labels == len(answer(cold, truth)) and not reply.duplicate
    first = watch.next_round(0)  # no other call: retrain → predict → query happen by themselves
    watch.close()

    assert first.round == 1 and first.model_version and len(first.spots) == 12
    labelled = {s.barcode for s in cold.spots}
    assert not labelled & {s.barcode for s in first.spots}, "a labelled spot was asked again"
    chain = [t for _, t in _topics_after(server, "loop-a", before)]
    assert chain == [
        events.LABELS_COMMITTED,
        events.MODEL_TRAINED,
        events.PREDICTIONS_READY,
        events.QUERYSET_READY,
    ]
    status = store.GetStatus(pb.GetStatusRequest(project_id="loop-a"))
    assert status.round == 1 and status.n_labelled == len(labelled) and status.latest_model_version


def test_two_quick_batches_make_one_retrain(server, store, channel, dlpfc) -> None:
    folder, truth = dlpfc
    watch = start_project(store, folder, "loop-b", query_size=10, head="logreg", seed=1)
    cold = watch.next_round(-1)
    training = next(w for w in server.workers if w.group == "training")
    training.stop(10)  # hold training so that both batches are waiting when it comes back
    half = len(cold.spots) // 2
    answers = answer(cold, truth)
    versions = [
        store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id="loop-b", dataset_id="151510", batch_id=f"quick-{i}", labels=part
            )
        ).label_version
        for i, part in enumerate((answers[:half], answers[half:]))
    ]
    probe = server.runtime.bus.consumer("training", [events.LABELS_COMMITTED])
    deadline = time.monotonic() + 30
    while probe.lag()[events.LABELS_COMMITTED] < 2:  # both batches relayed from the outbox
        assert time.monotonic() < deadline, "the outbox relay did not publish both batches"
        time.sleep(0.05)
    probe.close()
    parts = next(p for p in server.parts if p.name == "training")
    server.workers.remove(training)
    resumed = EventWorker(
        group="training",
        bus=server.runtime.bus,
        store=server.runtime.store,
        handlers=parts.handlers,
        coalesce=parts.coalesce,
        stopping=server.runtime.stopping,
    )
    resumed.start()
    server.workers.append(resumed)
    first = watch.next_round(0)
    watch.close()

    models = (
        training_pb2_grpc.TrainingServiceStub(channel)
        .ListModels(training_pb2.ListModelsRequest(project_id="loop-b"))
        .models
    )
    assert len(models) == 1, "two quick batches must coalesce into one retrain"
    assert models[0].label_version == max(versions)
    assert first.model_version == models[0].model_version


def test_transfer_to_a_dataset_with_missing_genes(server, store, channel, dlpfc, tmp_path) -> None:
    """A second slide is mapped into the first one's gene space; the model predicts it."""
    import anndata as ad

    from histoloop.v1 import (
        common_pb2,
        embedding_pb2,
        embedding_pb2_grpc,
        prediction_pb2,
        prediction_pb2_grpc,
    )

    folder, _ = dlpfc
    source = ad.read_h5ad(folder / "dlpfc151510_500genes.h5ad")
    dropped = list(source.var_names[:40])
    source[:, 40:].copy().write_h5ad(tmp_path / "other.h5ad")
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id="loop-a",
            dataset_id="other-slide",
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(folder / "spatial"),
            expression_path=str(tmp_path / "other.h5ad"),
        )
    )
    embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    deadline = time.monotonic() + 60
    while True:
        try:
            target = embedding.EmbedDataset(
                embedding_pb2.EmbedDatasetRequest(project_id="loop-a", dataset_id="other-slide")
            )
            break
        except Exception:  # noqa: BLE001 - NOT_FOUND until the embedding service is done
            assert time.monotonic() < deadline, "the second dataset was never embedded"
            time.sleep(0.2)
    reply = prediction_pb2_grpc.PredictionServiceStub(channel).Predict(
        prediction_pb2.PredictRequest(project_id="loop-a", embeddings_uri=target.embeddings_uri)
    )
    assert len(reply.barcodes) == len(reply.predicted) == target.n_spots > 4000
    assert sorted(reply.missing_genes) == sorted(dropped)
    assert set(reply.predicted) <= {
        "Layer1",
        "Layer2",
        "Layer3",
        "Layer4",
        "Layer5",
        "Layer6",
        "WM",
    }


def test_manual_train_rpc_retrains_and_the_loop_follows(server, store, channel, dlpfc) -> None:
    """``Train`` on demand (another head) registers a model, and a query set follows from it."""
    from tests.loop.conftest import Watch

    before = store.GetStatus(pb.GetStatusRequest(project_id="loop-a"))
    watch = Watch(store, "loop-a")
    training = training_pb2_grpc.TrainingServiceStub(channel)
    reply = training.Train(training_pb2.TrainRequest(project_id="loop-a", head="mlp", seed=7))
    assert (
        reply.model.head == "mlp"
        and reply.model.seed == 7
        and "manual" in reply.model.model_version
    )
    assert reply.model.metrics.n_train > 0 and reply.model.label_version == before.label_version
    follow = watch.next_round(before.round)
    watch.close()
    assert follow.model_version == reply.model.model_version
    assert follow.stopping.reason, "the query set carries the stopping signal"
    models = training.ListModels(training_pb2.ListModelsRequest(project_id="loop-a")).models
    assert reply.model.model_version in {m.model_version for m in models}
    with pytest.raises(grpc.RpcError) as err:
        training.Train(training_pb2.TrainRequest(project_id="loop-a", head="no-such-head"))
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "no-such-head" in err.value.details()
    )


def test_graph_smoothing_of_predictions_is_a_project_setting(server, store, dlpfc) -> None:
    """``smoothing`` > 0 evens out isolated predictions; a bad value is refused by name."""
    import numpy as np

    from histoloop.datasets import read_predictions
    from histoloop.spatial import neighbour_indices, visium_array_positions

    folder, truth = dlpfc
    runs = {}
    for project, smoothing in (("smooth-0", 0.0), ("smooth-1", 0.8)):
        watch = start_project(
            store, folder, project, query_size=15, head="logreg", seed=5, smoothing=smoothing
        )
        cold = watch.next_round(-1)
        store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id=project, dataset_id="151510", batch_id="b", labels=answer(cold, truth)
            )
        )
        first = watch.next_round(0)
        watch.close()
        uri = server.runtime.store.uri(f"predictions/{project}/{first.model_version}.npz")
        runs[project] = read_predictions(server.runtime.store, uri)
    plain, smooth = runs["smooth-0"], runs["smooth-1"]
    assert np.array_equal(plain.barcodes, smooth.barcodes)
    positions = visium_array_positions(plain.positions[:, 0], plain.positions[:, 1])
    neighbours = neighbour_indices(positions, 6)

    def roughness(p) -> float:  # how far each spot's probabilities are from its neighbours' mean
        return float(np.abs(p.probabilities - p.probabilities[neighbours].mean(axis=1)).mean())

    assert roughness(smooth) < 0.8 * roughness(plain)
    from histoloop.v1 import common_pb2

    with pytest.raises(grpc.RpcError) as err:
        store.CreateProject(
            pb.CreateProjectRequest(
                project_id="smooth-bad",
                name="x",
                classes=[common_pb2.ClassDef(name="a"), common_pb2.ClassDef(name="b")],
                config=common_pb2.LoopConfig(smoothing=1.5),
            )
        )
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        and "config.smoothing" in err.value.details()
    )


def _imbalanced_sample(into) -> tuple:
    """A small Visium-like section (array grid + counts): 8 stroma states in bands, one small tumour patch.

    The k-means cold start of a few spots takes typical spots of the big stroma bands, so its
    query set holds one class only (the reproduction of a stalled loop on an imbalanced section).
    """
    import json

    import anndata as ad
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    rows, cols, genes = 20, 24, 60
    barcodes, lines, truth, profile = [], [], {}, []
    for r in range(rows):
        for j in range(cols):
            barcode = f"S{r:02d}{j:02d}-1"
            tumour = r >= rows - 3 and j >= cols - 4  # a 3 × 4 patch in one corner
            state = 8 if tumour else j // 3
            lam = np.full(genes, 3.0)
            lam[state * 6 + (12 if tumour else 0) : state * 6 + 6 + (12 if tumour else 0)] = (
                30.0 if not tumour else 12.0
            )
            barcodes.append(barcode)
            profile.append(rng.poisson(lam))
            truth[barcode] = "tumour" if tumour else "stroma"
            lines.append(
                f"{barcode},1,{r},{2 * j + r % 2},{100 + 86 * r},{100 + 50 * (2 * j + r % 2)}"
            )
    spatial = into / "spatial"
    spatial.mkdir(parents=True)
    (spatial / "tissue_positions_list.csv").write_text("\n".join(lines) + "\n")
    (spatial / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": 55.0,
                "tissue_hires_scalef": 0.15,
                "fiducial_diameter_fullres": 80.0,
                "tissue_lowres_scalef": 0.05,
            }
        )
    )
    adata = ad.AnnData(
        X=sp.csr_matrix(np.asarray(profile, dtype=np.float32)),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame(index=[f"G{g:03d}" for g in range(genes)]),
    )
    adata.write_h5ad(into / "counts.h5ad")
    return spatial, into / "counts.h5ad", pd.Series(truth)


def test_labels_of_one_class_bring_more_spots_instead_of_a_stall(server, store, tmp_path) -> None:
    """The cold start hit one class only: training waits, so acquisition asks for more spots at once."""
    from histoloop.v1 import common_pb2
    from tests.loop.conftest import Watch

    spatial, counts, truth = _imbalanced_sample(tmp_path)
    store.CreateProject(
        pb.CreateProjectRequest(
            project_id="loop-rare",
            name="rare",
            classes=[common_pb2.ClassDef(name=n) for n in ("stroma", "tumour")],
            config=common_pb2.LoopConfig(
                features=common_pb2.FEATURE_SET_EXPRESSION, query_size=6, head="logreg"
            ),
        )
    )
    watch = Watch(store, "loop-rare")
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id="loop-rare",
            dataset_id="s1",
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(spatial),
            expression_path=str(counts),
        )
    )
    query_set, asked = watch.next_round(-1), set()
    assert {truth[s.barcode] for s in query_set.spots} == {"stroma"}, (
        "the reproduction: one class only"
    )
    more = []
    while not query_set.model_version:
        asked |= {s.barcode for s in query_set.spots}
        store.SubmitLabels(
            pb.SubmitLabelsRequest(
                project_id="loop-rare",
                dataset_id="s1",
                batch_id=f"b{query_set.round}",
                labels=answer(query_set, truth),
            )
        )
        query_set = watch.next_round(query_set.round)  # never a wait for a model that cannot come
        assert not asked & {s.barcode for s in query_set.spots}, "a labelled spot was asked again"
        if not query_set.model_version:
            more.append(query_set)
            status = store.GetStatus(pb.GetStatusRequest(project_id="loop-rare"))
            assert status.notice == "need labels of at least 2 classes; asking 6 more spots"
            assert not status.latest_model_version and status.round == query_set.round
        assert len(more) <= 3, "the more-spots sets never found the second class"
    watch.close()
    assert more and all(q.strategy == "coverage" and len(q.spots) == 6 for q in more)
    assert {s.reason for q in more for s in q.spots} == {"diversity"}
    status = store.GetStatus(pb.GetStatusRequest(project_id="loop-rare"))
    assert (
        status.labelled_per_class["tumour"] > 0
        and status.latest_model_version
        and not status.notice
    )
