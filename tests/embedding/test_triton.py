"""Triton and in-process ONNX give the same vectors (one real tritonserver for the module)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from histoloop.embedding import (
    EmbeddingShapeError,
    ModelIO,
    OnnxEmbedder,
    TritonEmbedder,
    make_embedder,
)
from histoloop.errors import InvalidArgument, NotFound, Unavailable
from tests.embedding.conftest import TOY, TOY_DIM, TOY_MAX_BATCH
from tests.embedding.models import small_cnn
from tests.fixtures.s3 import free_port
from tests.fixtures.triton import TritonServer


def _patches(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def _torch_reference(patches: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return small_cnn(TOY_DIM)((x - mean) / std).numpy()


def test_triton_reads_the_model_contract(triton: TritonServer) -> None:
    with TritonEmbedder(triton.grpc_url, TOY) as emb:
        assert emb.max_batch_size == TOY_MAX_BATCH and emb.batch_size == TOY_MAX_BATCH
        assert emb.dim == TOY_DIM and emb.input_size == (224, 224)
        assert emb.io.input_name == "pixels" and emb.io.input_dtype == "UINT8"
        assert emb.io.layout == "NHWC" and emb.version == "1"
        emb.ping()


def test_triton_equals_onnx_in_process(triton: TritonServer, model_repo: Path) -> None:
    patches = _patches(37)  # five batches of 8 (the last one short), several in flight
    onnx = make_embedder("onnx", model_repository=model_repo, model_name=TOY)
    with make_embedder("triton", url=triton.grpc_url, model_name=TOY, max_in_flight=3) as remote:
        via_triton = remote.embed(patches)
        assert remote.embed(patches[:0]).shape == (0, TOY_DIM)
    local = onnx.embed(patches)
    assert via_triton.dtype == np.float32 and via_triton.shape == (37, TOY_DIM)
    np.testing.assert_allclose(via_triton, local, atol=1e-4, rtol=0)
    np.testing.assert_allclose(local, _torch_reference(patches), atol=1e-4, rtol=1e-4)
    assert onnx.name == TOY and onnx.version == "1" and onnx.dim == TOY_DIM


def test_wrong_patch_size_is_refused(triton: TritonServer) -> None:
    with TritonEmbedder(triton.grpc_url, TOY) as emb, pytest.raises(InvalidArgument, match="224"):
        emb.embed(np.zeros((2, 64, 64, 3), np.uint8))


def test_expected_dim_mismatch_fails_loudly(triton: TritonServer) -> None:
    with pytest.raises(EmbeddingShapeError, match="1024"):
        TritonEmbedder(triton.grpc_url, TOY, expected_dim=1024)


def test_unknown_model(triton: TritonServer) -> None:
    with pytest.raises(NotFound, match="nope"):
        TritonEmbedder(triton.grpc_url, "nope", retries=2, backoff_s=0.01)


def test_unreachable_triton_retries_then_raises_unavailable() -> None:
    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(Unavailable, match="3 attempts") as err:
        TritonEmbedder(url, TOY, retries=3, backoff_s=0.05, timeout_s=2)
    elapsed = time.monotonic() - started
    assert url in str(err.value)
    assert 0.15 <= elapsed < 10  # two backoffs: 0.05 s, then 0.1 s


def test_output_shape_check() -> None:
    io = ModelIO.from_shapes(
        "m",
        input_name="pixels",
        input_dtype="UINT8",
        input_shape=[224, 224, 3],
        output_name="embedding",
        output_shape=[8],
    )
    assert io.check_output(np.zeros((4, 8), np.float32), 4, 8).shape == (4, 8)
    for bad in (np.zeros((3, 8)), np.zeros((4, 7)), np.zeros((4, 8, 1)), None):
        with pytest.raises(EmbeddingShapeError):
            io.check_output(bad, 4, 8)
    with pytest.raises(EmbeddingShapeError, match="per-item shape"):
        ModelIO.from_shapes(
            "m",
            input_name="x",
            input_dtype="FP32",
            input_shape=[224, 224],
            output_name="y",
            output_shape=[8],
        )
    with pytest.raises(EmbeddingShapeError, match="one vector"):
        ModelIO.from_shapes(
            "m",
            input_name="x",
            input_dtype="FP32",
            input_shape=[3, 224, 224],
            output_name="y",
            output_shape=[197, 768],
        )


def test_float_nchw_models_get_normalised_input() -> None:
    io = ModelIO.from_shapes(
        "m",
        input_name="x",
        input_dtype="TYPE_FP32",
        input_shape=[3, 4, 4],
        output_name="y",
        output_shape=[-1],
    )
    x = io.prepare(np.full((1, 4, 4, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0)
    assert io.dim == -1 and io.input_size == (4, 4)


def test_onnx_embedder_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        OnnxEmbedder(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(InvalidArgument, match="bad.onnx"):
        OnnxEmbedder(bad)
    with pytest.raises(NotFound):
        make_embedder("onnx", model_repository=tmp_path, model_name="toy")
    with pytest.raises(InvalidArgument, match="unknown embedder kind"):
        make_embedder("gpu-magic")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="bad options"):
        make_embedder("handcrafted", colour="blue")
