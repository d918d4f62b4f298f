"""The embedder interface and its errors."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from histoloop.errors import FailedPrecondition, InvalidArgument

__all__ = ["Embedder", "EmbeddingShapeError", "check_patches"]


class EmbeddingShapeError(FailedPrecondition):
    """A model's declared or returned shapes do not match the contract (fail loudly)."""


def check_patches(patches: np.ndarray, *, size: tuple[int, int] | None = None) -> np.ndarray:
    """Check a batch of patches: uint8 (n, H, W, 3), and (H, W) == ``size`` when given.

    Raises:
        InvalidArgument: wrong dtype, rank, channel count or size.
    """
    if not isinstance(patches, np.ndarray):
        raise InvalidArgument(f"patches must be a numpy array, got {type(patches).__name__}")
    if patches.dtype != np.uint8:
        raise InvalidArgument(f"patches must be uint8, got {patches.dtype}")
    if patches.ndim != 4 or patches.shape[-1] != 3:
        raise InvalidArgument(f"patches must have shape (n, H, W, 3), got {patches.shape}")
    if size is not None and tuple(patches.shape[1:3]) != tuple(size):
        raise InvalidArgument(
            f"patches are {patches.shape[1]}×{patches.shape[2]} px but the model takes "
            f"{size[0]}×{size[1]}; tile with patch_size={size[0]}"
        )
    return patches


class Embedder(ABC):
    """Turns image patches into vectors.

    Implementations: :class:`~histoloop.embedding.TritonEmbedder` (a model served by
    Triton), :class:`~histoloop.embedding.OnnxEmbedder` (the same ONNX artifact run
    in-process) and :class:`~histoloop.embedding.HandcraftedEmbedder` (morphology
    features, no model). Choose one with :func:`~histoloop.embedding.make_embedder`.
    """

    #: model name recorded with the embeddings
    name: str
    #: model version recorded with the embeddings
    version: str = ""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of each vector."""

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The (H, W) patches must have, or None if any size is accepted."""
        return None

    @abstractmethod
    def embed(self, patches: np.ndarray) -> np.ndarray:
        """Embed uint8 (n, H, W, 3) patches → float32 (n, dim).

        Raises:
            InvalidArgument: malformed patches.
            Unavailable: the model server cannot be reached (remote embedders).
            EmbeddingShapeError: the model returned vectors of the wrong shape.
        """

    def ping(self) -> None:  # noqa: B027 - optional for in-process embedders
        """Raise :class:`histoloop.errors.Unavailable` if the model cannot serve now."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources; safe to call twice."""

    def __enter__(self) -> Embedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
