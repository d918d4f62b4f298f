"""MC-dropout (Gal & Ghahramani, 2016) for the MLP heads: BALD without an ensemble.

A head trained with dropout on its hidden layer is sampled ``T`` times with dropout
left on; the spread of the ``T`` predictions is the model's epistemic uncertainty, and
BALD reads it exactly as it reads an ensemble's members. The ``T`` dropout masks are
drawn once from the head's seed and shared by every spot, so each pass is one thinned
network (a sample of the weights), the result is reproducible, and the exported
TorchScript module (:mod:`histoloop.training.export`) carries the same masks as a
buffer and gives the prediction service the same member probabilities.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from histoloop.errors import InvalidArgument

from .heads import Head, HeadInput, MLPHead, MultimodalHead

__all__ = ["dropout_masks", "mc_dropout_proba", "mc_masks_for"]

_SALT = 0xD80


def dropout_masks(width: int, rate: float, samples: int, seed: int) -> np.ndarray:
    """``samples`` inverted-dropout masks over a hidden layer of ``width`` units.

    Args:
        width: Hidden width.
        rate: Dropout probability in (0, 1).
        samples: Number of masks (passes), ≥ 1.
        seed: Seed (the head's).

    Returns:
        ``(samples, width)`` float32: 0 for a dropped unit, ``1 / (1 − rate)`` otherwise.

    Raises:
        InvalidArgument: Out-of-range argument.
    """
    if not 0.0 < rate < 1.0 or samples < 1 or width < 1:
        raise InvalidArgument(
            f"MC-dropout needs 0 < rate < 1, samples ≥ 1 and width ≥ 1, got {rate}, {samples}, {width}"
        )
    rng = np.random.default_rng([int(seed), _SALT])
    keep = rng.random((samples, width)) >= rate
    return (keep / (1.0 - rate)).astype(np.float32)


def mc_masks_for(head: Head) -> np.ndarray | None:
    """The masks of ``head`` when it samples MC-dropout (``mc_samples > 0``), else None."""
    if not isinstance(head, MLPHead | MultimodalHead) or not head.config.mc_samples:
        return None
    return dropout_masks(head.config.hidden, head.config.dropout, head.config.mc_samples, head.seed)


def _classifier(head: Head) -> nn.Linear:
    module = getattr(head, "module", None)
    classifier = getattr(module, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise InvalidArgument(f"head {head.name!r} has no hidden-layer classifier for MC-dropout")
    return classifier


def mc_dropout_proba(head: Head, X: HeadInput) -> np.ndarray:
    """Class probabilities of every MC-dropout pass, ``(T, n, C)`` float32.

    Args:
        head: A fitted ``mlp`` or ``multimodal`` head with ``mc_samples > 0``.
        X: Its (scaled) inputs.

    Returns:
        ``(mc_samples, n, C)`` float32 probabilities, one slice per pass.

    Raises:
        InvalidArgument: The head does not sample MC-dropout.
    """
    masks = mc_masks_for(head)
    if masks is None:
        raise InvalidArgument(
            f"head {head.name!r} does not sample MC-dropout (needs mlp/multimodal with mc_samples > 0)"
        )
    H = torch.from_numpy(head.hidden(X))
    classifier = _classifier(head)
    out = np.empty((len(masks), H.shape[0], head.n_classes), dtype=np.float32)
    with torch.no_grad():
        for t, mask in enumerate(torch.from_numpy(masks)):
            out[t] = torch.softmax(classifier(H * mask), dim=1).numpy()
    return out
