"""tools/export_model.py: torch module → Triton model repository (ONNX + config.pbtxt)."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from histoloop.embedding import OnnxEmbedder
from tests.embedding.conftest import REPO, TOY, TOY_DIM, TOY_MAX_BATCH
from tests.embedding.models import small_cnn


def test_exported_repository_layout(model_repo: Path) -> None:
    config = (model_repo / TOY / "config.pbtxt").read_text()
    assert (model_repo / TOY / "1" / "model.onnx").is_file()
    assert 'name: "toy"' in config and 'platform: "onnxruntime_onnx"' in config
    assert f"max_batch_size: {TOY_MAX_BATCH}" in config
    assert re.search(r'name: "pixels"\s+data_type: TYPE_UINT8\s+dims: \[ 224, 224, 3 \]', config)
    assert re.search(rf'name: "embedding"\s+data_type: TYPE_FP32\s+dims: \[ {TOY_DIM} \]', config)
    assert "dynamic_batching" in config and "kind: KIND_CPU" in config


def test_onnx_matches_torch_for_any_batch_size(model_repo: Path) -> None:
    session = ort.InferenceSession(
        str(model_repo / TOY / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("pixels", "tensor(uint8)", [224, 224, 3])
    assert (out.name, out.shape[1:]) == ("embedding", [TOY_DIM])
    embedder = OnnxEmbedder(model_repo / TOY / "1" / "model.onnx", batch_size=4)
    patches = np.random.default_rng(3).integers(0, 256, (5, 224, 224, 3), dtype=np.uint8)
    one_by_one = np.concatenate([embedder.embed(p[None]) for p in patches])
    np.testing.assert_allclose(embedder.embed(patches), one_by_one, atol=1e-5)


def test_export_refuses_to_overwrite(model_repo: Path, export_tool: ModuleType) -> None:
    with pytest.raises(FileExistsError):
        export_tool.export_module(small_cnn(TOY_DIM), model_repo, TOY)


def test_expected_dim_is_checked(tmp_path: Path, export_tool: ModuleType) -> None:
    with pytest.raises(ValueError, match="1024"):
        export_tool.export_module(small_cnn(8), tmp_path, "x", input_size=64, expected_dim=1024)


def test_command_line_with_a_factory(tmp_path: Path, export_tool: ModuleType) -> None:
    status = export_tool.main(
        [
            "--factory",
            "tests.embedding.models:small_cnn",
            "--name",
            "cli",
            "--input-size",
            "64",
            "--max-batch-size",
            "4",
            "--repository",
            str(tmp_path),
            "--instance-kind",
            "KIND_CPU",
            "--dim-check",
            "16",
        ]
    )
    assert status == 0
    embedder = OnnxEmbedder(tmp_path / "cli" / "1" / "model.onnx")
    assert embedder.dim == 16 and embedder.input_size == (64, 64) and embedder.name == "cli"
    assert "max_batch_size: 4" in (tmp_path / "cli" / "config.pbtxt").read_text()
    with pytest.raises(SystemExit):
        export_tool.main(["--preset", "uni", "--repository", str(tmp_path)])  # no --weights


@pytest.mark.parametrize(("name", "dim", "max_batch"), [("uni", 1024, 64), ("phikon", 768, 128)])
def test_committed_reference_configs(
    name: str, dim: int, max_batch: int, export_tool: ModuleType
) -> None:
    preset = export_tool.PRESETS[name]
    committed = (REPO / "deploy" / "triton" / name / "config.pbtxt").read_text()
    assert committed == export_tool.render_config(
        name,
        preset.dim,
        input_size=preset.input_size,
        max_batch_size=preset.max_batch_size,
        description=preset.description,
    )
    assert f"dims: [ {dim} ]" in committed and f"max_batch_size: {max_batch}" in committed
    assert "kind: KIND_GPU" in committed
