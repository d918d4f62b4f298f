"""EfficientNet-Lite0 exported to ONNX and served by a real tritonserver (CPU) with dynamic
batching; UNI/Phikon presets exercised with random-weight ViTs of their architecture."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from histoloop.embedding import EfficientNetEmbedder, OnnxEmbedder, make_embedder
from tests.fixtures.triton import TritonServer, onnx_model_spec, serve_models

NAME = "efficientnet-lite0"
MAX_BATCH = 16
TOLERANCE = 1e-4  # |Triton − in-process torch|, absolute and relative: float32 op-order noise


@pytest.fixture(scope="module")
def effnet_repo(tmp_path_factory: pytest.TempPathFactory, export_tool: ModuleType) -> Path:
    repo = tmp_path_factory.mktemp("effnet-repo")
    preset = export_tool.PRESETS[NAME]
    export_tool.export_module(
        export_tool.load_factory(preset.factory),
        repo,
        NAME,
        max_batch_size=MAX_BATCH,
        instance_kind="KIND_CPU",
        expected_dim=preset.dim,
        description=preset.description,
    )
    return repo


@pytest.fixture(scope="module")
def effnet_triton(effnet_repo: Path) -> Iterator[TritonServer]:
    with serve_models([onnx_model_spec(NAME, effnet_repo / NAME / "1" / "model.onnx")]) as server:
        yield server


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def test_config_declares_the_contract_and_dynamic_batching(effnet_repo: Path) -> None:
    config = (effnet_repo / NAME / "config.pbtxt").read_text()
    for line in (
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {MAX_BATCH}",
        "data_type: TYPE_UINT8",
        "dims: [ 224, 224, 3 ]",
        "dims: [ 1280 ]",
        "preferred_batch_size: [ 16 ]",
        "max_queue_delay_microseconds: 2000",
        "kind: KIND_CPU",
    ):
        assert line in config


def test_triton_vectors_equal_the_in_process_network(effnet_triton: TritonServer) -> None:
    patches = _patches(MAX_BATCH + 3)  # two requests, the second short
    with make_embedder("triton", url=effnet_triton.grpc_url, model_name=NAME) as remote:
        assert (
            remote.dim == 1280
            and remote.input_size == (224, 224)
            and remote.max_batch_size == MAX_BATCH
        )
        via_triton = remote.embed(patches)
    in_process = EfficientNetEmbedder(threads=2, runtime="torch").embed(
        patches
    )  # eager torch, the reference
    np.testing.assert_allclose(via_triton, in_process, atol=TOLERANCE, rtol=TOLERANCE)


def test_concurrent_requests_are_batched_by_triton(effnet_triton: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(effnet_triton.grpc_url)
    headers = effnet_triton.grpc_access_headers
    before = client.get_inference_statistics(NAME, headers=headers).model_stats[0]
    n_clients, per_client = 12, 2
    errors: list[BaseException] = []

    def send(seed: int) -> None:
        try:
            with make_embedder("triton", url=effnet_triton.grpc_url, model_name=NAME) as emb:
                for i in range(per_client):
                    assert emb.embed(_patches(1, seed * 10 + i)).shape == (1, 1280)
        except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s,)) for s in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    after = client.get_inference_statistics(NAME, headers=headers).model_stats[0]
    inferences = after.inference_count - before.inference_count
    executions = after.execution_count - before.execution_count
    assert inferences == n_clients * per_client
    assert executions < inferences, (executions, inferences)  # several requests per model execution


@pytest.mark.parametrize("preset_name", ["uni", "phikon"])
def test_foundation_presets_export_through_the_same_path(
    preset_name: str, export_tool: ModuleType, tmp_path: Path
) -> None:
    """A random-weight ViT of the preset's width, heads and patch size (one block, for speed)."""
    preset = export_tool.PRESETS[preset_name]
    vit = export_tool.random_vit(preset, depth=1)
    result = export_tool.export_module(
        vit,
        tmp_path,
        preset.name,
        max_batch_size=preset.max_batch_size,
        expected_dim=preset.dim,
        description=preset.description,
    )
    assert result.dim == preset.dim and result.max_abs_diff < 1e-3
    config = result.config_path.read_text()
    assert (
        f"max_batch_size: {preset.max_batch_size}" in config and f"dims: [ {preset.dim} ]" in config
    )
    onnx = OnnxEmbedder(result.onnx_path)
    vectors = onnx.embed(_patches(3))
    assert vectors.shape == (3, preset.dim) and np.isfinite(vectors).all()
    assert onnx.name == preset.name and onnx.version == "1"
