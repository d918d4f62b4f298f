"""The model input/output contract shared by the Triton and the in-process ONNX embedders.

An exported model (``tools/export_model.py``) takes uint8 patches NHWC — ``pixels``,
``[-1, H, W, 3]`` — and does its own scaling and normalisation, and returns one float32
vector per patch — ``embedding``, ``[-1, D]``. Models that take float NCHW or NHWC input
instead are supported too: the client then scales to [0, 1] and normalises with
``mean``/``std`` (ImageNet's by default). Anything else fails loudly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from histoloop.embedding._base import EmbeddingShapeError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ModelIO"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NUMPY = {"UINT8": np.uint8, "FP32": np.float32, "FP16": np.float16}


def _dim(value: object) -> int:
    """A dimension as an int, -1 when dynamic (None, a symbolic name, '-1')."""
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return -1
    return number if number > 0 else -1


@dataclass(frozen=True)
class ModelIO:
    """What a model takes and returns, learned from its metadata."""

    model: str
    input_name: str
    input_dtype: Literal["UINT8", "FP32", "FP16"]
    layout: Literal["NHWC", "NCHW"]
    height: int
    width: int
    output_name: str
    dim: int
    """Vector length; -1 while unknown (dynamic), learned from the first response."""

    @classmethod
    def from_shapes(
        cls,
        model: str,
        *,
        input_name: str,
        input_dtype: str,
        input_shape: Sequence[object],
        output_name: str,
        output_shape: Sequence[object],
    ) -> ModelIO:
        """Build the contract from per-item shapes (batch dimension removed).

        Raises:
            EmbeddingShapeError: the input is not one 3-channel image per item, its dtype
                is not UINT8/FP32/FP16, or the output is not one vector per item.
        """
        dtype = input_dtype.upper().replace("TYPE_", "")
        if dtype not in _NUMPY:
            raise EmbeddingShapeError(
                f"model {model!r}: input {input_name!r} has type {input_dtype}; expected "
                "UINT8, FP32 or FP16"
            )
        shape = [_dim(d) for d in input_shape]
        if len(shape) == 3 and shape[2] == 3:
            layout: Literal["NHWC", "NCHW"] = "NHWC"
            height, width = shape[0], shape[1]
        elif len(shape) == 3 and shape[0] == 3:
            layout, height, width = "NCHW", shape[1], shape[2]
        else:
            raise EmbeddingShapeError(
                f"model {model!r}: input {input_name!r} has per-item shape {list(input_shape)}; "
                "expected [H, W, 3] or [3, H, W]"
            )
        out = [_dim(d) for d in output_shape]
        if len(out) != 1:
            raise EmbeddingShapeError(
                f"model {model!r}: output {output_name!r} has per-item shape "
                f"{list(output_shape)}; expected one vector per patch, [D]"
            )
        return cls(
            model=model,
            input_name=input_name,
            input_dtype=dtype,  # type: ignore[arg-type]
            layout=layout,
            height=height,
            width=width,
            output_name=output_name,
            dim=out[0],
        )

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) the model takes, None if dynamic."""
        return (self.height, self.width) if self.height > 0 and self.width > 0 else None

    def prepare(
        self, patches: np.ndarray, mean: Sequence[float], std: Sequence[float]
    ) -> np.ndarray:
        """uint8 NHWC patches → the model's input tensor."""
        if self.input_dtype == "UINT8":
            x = patches
        else:
            x = patches.astype(np.float32) / np.float32(255)
            x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
            x = x.astype(_NUMPY[self.input_dtype])
        if self.layout == "NCHW":
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x)

    def check_output(self, output: np.ndarray | None, batch: int, dim: int) -> np.ndarray:
        """Check one response: (batch, dim) finite-typed floats → float32.

        Raises:
            EmbeddingShapeError: missing output or wrong shape.
        """
        if output is None:
            raise EmbeddingShapeError(
                f"model {self.model!r} returned no output {self.output_name!r}"
            )
        if output.ndim != 2 or output.shape[0] != batch or (dim > 0 and output.shape[1] != dim):
            raise EmbeddingShapeError(
                f"model {self.model!r}: output {self.output_name!r} has shape "
                f"{tuple(output.shape)} for a batch of {batch}; expected ({batch}, "
                f"{dim if dim > 0 else 'D'})"
            )
        return output.astype(np.float32, copy=False)
