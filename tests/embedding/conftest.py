"""Fixtures for the embedding tests: an exported toy model, a Triton server, patches."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from histoloop.artifacts.local import LocalArtifactStore
from histoloop.tiling import TilingResult, tile_visium
from tests.embedding.models import small_cnn
from tests.fixtures.triton import TritonServer, onnx_model_spec, serve_models
from tests.tiling.visium_fake import make_visium

REPO = Path(__file__).resolve().parents[2]
TOY = "toy"
TOY_DIM = 16
TOY_MAX_BATCH = 8


@pytest.fixture(scope="session")
def export_tool() -> ModuleType:
    """``tools/export_model.py`` imported as a module."""
    spec = importlib.util.spec_from_file_location(
        "export_model", REPO / "tools" / "export_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["export_model"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory, export_tool: ModuleType) -> Path:
    """A Triton model repository holding the toy CNN, exported by the export tool."""
    repo = tmp_path_factory.mktemp("model-repo")
    export_tool.export_module(
        small_cnn(TOY_DIM),
        repo,
        TOY,
        input_size=224,
        max_batch_size=TOY_MAX_BATCH,
        instance_kind="KIND_CPU",
    )
    return repo


@pytest.fixture(scope="module")
def triton(model_repo: Path) -> Iterator[TritonServer]:
    """A real tritonserver (pytriton, CPU) serving the toy ONNX model over gRPC."""
    with serve_models([onnx_model_spec(TOY, model_repo / TOY / "1" / "model.onnx")]) as server:
        yield server


@pytest.fixture(scope="session")
def visium_patches(
    tmp_path_factory: pytest.TempPathFactory, shared_data: Path
) -> tuple[LocalArtifactStore, TilingResult]:
    """Patches (224 px) of the Visium-like dataset on the CMU slide, in a store."""
    root = tmp_path_factory.mktemp("visium")
    slide = shared_data / "wsi" / "CMU-1-Small-Region.svs"
    spatial = make_visium(slide, root / "visium")
    store = LocalArtifactStore(root / "store")
    result = tile_visium(slide, spatial, store, "proj/cmu/tiles", workers=1, chunk_size=24)
    return store, result
