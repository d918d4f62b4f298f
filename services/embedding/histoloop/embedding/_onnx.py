"""In-process embedding with onnxruntime, from the same ``model.onnx`` Triton serves."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histoloop.embedding._base import Embedder, EmbeddingShapeError, check_patches
from histoloop.embedding._modelio import IMAGENET_MEAN, IMAGENET_STD, ModelIO
from histoloop.errors import InvalidArgument, NotFound

__all__ = ["OnnxEmbedder", "onnx_model_path"]

log = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(float16)": "FP16"}


def onnx_model_path(model_repository: str | Path, model_name: str, model_version: str = "") -> Path:
    """``<repository>/<model>/<version>/model.onnx`` (the highest version if none is given).

    Raises:
        NotFound: no such model or version.
    """
    folder = Path(model_repository) / model_name
    if not model_version:
        versions = sorted((int(p.name) for p in folder.glob("*") if p.name.isdigit()), reverse=True)
        if not versions:
            raise NotFound(f"model repository {model_repository}: no versions of {model_name!r}")
        model_version = str(versions[0])
    path = folder / model_version / "model.onnx"
    if not path.is_file():
        raise NotFound(f"model file {path} does not exist")
    return path


def _ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's own exception types (Fail, InvalidProtobuf, NoSuchFile, …)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    found = tuple(
        v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)
    )
    return (*found, OSError, ValueError)


class OnnxEmbedder(Embedder):
    """Runs an exported ONNX embedding model in this process (the embedded default).

    Args:
        model_path: the ``model.onnx`` file.
        name: model name recorded with the embeddings (default: the repository folder
            name for ``<name>/<version>/model.onnx``, else the file stem).
        version: model version recorded (default: the version folder name, if numeric).
        batch_size: patches per ``session.run``.
        threads: onnxruntime intra-op threads (default: onnxruntime's choice).
        providers: onnxruntime execution providers (default CPU).
        mean: per-channel mean for float inputs (models that do not normalise themselves).
        std: per-channel std for float inputs.
        expected_dim: fail at start if the model's vectors are not this long.

    Raises:
        NotFound: no file at ``model_path``.
        InvalidArgument: onnxruntime cannot load it.
        EmbeddingShapeError: its inputs/outputs break the contract.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        name: str | None = None,
        version: str | None = None,
        batch_size: int = 32,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        expected_dim: int | None = None,
    ) -> None:
        import onnxruntime as ort

        path = Path(model_path)
        if not path.is_file():
            raise NotFound(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self._session = ort.InferenceSession(
                str(path), options, providers=list(providers or ["CPUExecutionProvider"])
            )
        except _ort_errors() as exc:
            raise InvalidArgument(f"onnxruntime cannot load {path}: {exc}") from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) < 1:
            raise EmbeddingShapeError(
                f"ONNX model {path}: expected one input and one output, got "
                f"{[i.name for i in inputs]} → {[o.name for o in outputs]}"
            )
        parent = path.parent
        self.name = name or (parent.parent.name if parent.name.isdigit() else path.stem)
        self.version = (
            version if version is not None else (parent.name if parent.name.isdigit() else "")
        )
        self.io = ModelIO.from_shapes(
            self.name,
            input_name=inputs[0].name,
            input_dtype=_ORT_TYPES.get(inputs[0].type, inputs[0].type),
            input_shape=list(inputs[0].shape)[1:],
            output_name=outputs[0].name,
            output_shape=list(outputs[0].shape)[1:],
        )
        batch_dim = inputs[0].shape[0] if inputs[0].shape else None
        self._fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
        self.batch_size = self._fixed_batch or max(1, int(batch_size))
        self.mean, self.std = tuple(mean), tuple(std)
        self._dim = self.io.dim
        if self._dim <= 0:  # dynamic output length: learn it from one blank patch
            h, w = self.io.input_size or (224, 224)
            self._dim = self._run(np.zeros((1, h, w, 3), np.uint8)).shape[1]
        if expected_dim is not None and self._dim != expected_dim:
            raise EmbeddingShapeError(
                f"ONNX model {path} returns {self._dim}-d vectors; expected {expected_dim}"
            )
        self.path = path
        log.info(
            "ONNX embedder %s (version %r): %s %s input, %d-d output, batch %d",
            self.name,
            self.version,
            self.io.layout,
            self.io.input_dtype,
            self._dim,
            self.batch_size,
        )

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def input_size(self) -> tuple[int, int] | None:
        return self.io.input_size

    def _run(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self._fixed_batch and n < self._fixed_batch:
            pad = np.zeros((self._fixed_batch - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        x = self.io.prepare(batch, self.mean, self.std)
        (out,) = self._session.run([self.io.output_name], {self.io.input_name: x})
        return self.io.check_output(np.asarray(out)[:n], n, getattr(self, "_dim", -1))

    def embed(self, patches: np.ndarray) -> np.ndarray:
        check_patches(patches, size=self.io.input_size)
        out = np.empty((len(patches), self.dim), dtype=np.float32)
        for start in range(0, len(patches), self.batch_size):
            out[start : start + self.batch_size] = self._run(
                patches[start : start + self.batch_size]
            )
        return out
