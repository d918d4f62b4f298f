"""Augmentation views as a project setting, legacy ST registration, the embedding model in a
dataset's status — through the real gRPC server on both databases."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import common_pb2
from tests.annotation_store.conftest import LAYERS, GrpcEnv, new_project_id


def _create(env: GrpcEnv, **config: object) -> pb.Project:
    return env.stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=new_project_id(),
            name="morph",
            classes=[common_pb2.ClassDef(name=c) for c in LAYERS],
            config=common_pb2.LoopConfig(**config),
        ),
        metadata=env.md(env.admin_token),
    )


def test_augment_views_off_by_default_ten_in_the_paper_preset(grpc_env: GrpcEnv) -> None:
    assert _create(grpc_env).config.augment_views == 0  # by evidence (benchmarks/README.md, A1)
    assert _create(grpc_env, preset="activevisium").config.augment_views == 10  # the seed's setting
    assert _create(grpc_env, preset="activevisium", augment_views=0).config.augment_views == 0
    assert _create(grpc_env, augment_views=0).config.augment_views == 0
    assert _create(grpc_env, augment_views=3, smoothing=0.5).config.augment_views == 3
    with pytest.raises(grpc.RpcError) as err:
        _create(grpc_env, augment_views=33)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.augment_views" in err.value.details()


def test_zero_spatial_neighbours_is_a_value_not_unset(grpc_env: GrpcEnv) -> None:
    """Unset takes the default (6, by evidence); an explicit 0 turns the features off, at
    creation and in UpdateProject."""
    assert _create(grpc_env).config.spatial_neighbours == 6
    assert _create(grpc_env, preset="activevisium").config.spatial_neighbours == 0
    off = _create(grpc_env, spatial_neighbours=0)
    assert off.config.spatial_neighbours == 0
    md = grpc_env.md(grpc_env.admin_token)
    on = grpc_env.stub.UpdateProject(
        pb.UpdateProjectRequest(
            project_id=off.project_id, config=common_pb2.LoopConfig(spatial_neighbours=4)
        ),
        metadata=md,
    )
    assert on.config.spatial_neighbours == 4
    kept = grpc_env.stub.UpdateProject(
        pb.UpdateProjectRequest(
            project_id=off.project_id, config=common_pb2.LoopConfig(query_size=7)
        ),
        metadata=md,
    )
    assert (kept.config.spatial_neighbours, kept.config.query_size) == (4, 7)
    again = grpc_env.stub.UpdateProject(
        pb.UpdateProjectRequest(
            project_id=off.project_id, config=common_pb2.LoopConfig(spatial_neighbours=0)
        ),
        metadata=md,
    )
    assert again.config.spatial_neighbours == 0


def test_legacy_st_spots_register_and_the_embedding_model_shows(
    grpc_env: GrpcEnv, shared_data: Path, tmp_path: Path
) -> None:
    project = _create(grpc_env).project_id
    md = grpc_env.md(grpc_env.admin_token)
    a1 = shared_data / "her2st" / "A1"
    dataset = grpc_env.stub.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=project,
            dataset_id="a1",
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(a1),
            slide_path=str(a1 / "A1_HE_image_dark.png"),
            slide_scale=2000 / 6954,
        ),
        metadata=md,
    )
    assert (dataset.n_spots, dataset.n_in_tissue) == (348, 348)
    assert dataset.embedding_model == ""  # not embedded yet

    bad = tmp_path / "B1_selection.tsv"
    bad.write_text("x\ty\tpixel_x\tpixel_y\n1\t2\t3.5\t4.5\n1\t2.5\t5\t6\n")
    with pytest.raises(grpc.RpcError) as err:
        grpc_env.stub.RegisterDataset(
            pb.RegisterDatasetRequest(
                project_id=project,
                dataset_id="b1",
                spatial_dir=str(bad),
                positions_format="legacy-st",
            ),
            metadata=md,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        "column 'y' on line 3" in err.value.details() and "B1_selection.tsv" in err.value.details()
    )
    with pytest.raises(grpc.RpcError) as err:
        grpc_env.stub.RegisterDataset(
            pb.RegisterDatasetRequest(
                project_id=project,
                dataset_id="b1",
                spatial_dir=str(a1),
                positions_format="visium-hd",
            ),
            metadata=md,
        )
    assert "positions_format" in err.value.details()
    got = grpc_env.stub.GetProject(pb.GetProjectRequest(project_id=project), metadata=md)
    assert list(got.datasets) == ["a1"]  # the bad registrations left nothing behind


def test_the_embedding_model_is_recorded_with_the_datasets_embeddings(repo, project: str) -> None:
    assert repo.set_embeddings(
        project,
        "ds1",
        "file:///e.h5ad",
        "ev-1",
        model="efficientnet-lite0",
        model_version="0.1.0+efficientnet-lite0-57934424",
        dim=1280,
    )
    info = repo.get_dataset(project, "ds1")
    assert (info.embedding_model, info.embedding_model_version, info.embedding_dim) == (
        "efficientnet-lite0",
        "0.1.0+efficientnet-lite0-57934424",
        1280,
    )
    assert not repo.set_embeddings(project, "ds1", "file:///e.h5ad", "ev-1", model="other")  # seen
    assert repo.get_dataset(project, "ds1").embedding_model == "efficientnet-lite0"
