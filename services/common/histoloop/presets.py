"""Named loop presets and the project defaults, in one place.

A project's ``LoopConfig`` has a ``preset`` field. Its unset fields take the values of the
preset, and the preset's head hyper-parameters are used by training:

* ``""`` (default): the defaults chosen by evidence from simulated campaigns on the
  development data (``benchmarks/README.md``, "Defaults by evidence"): :data:`DEFAULTS`.
* ``"activevisium"``: the ActiveVisium paper (ECML-PKDD 2025): the two-stage
  ``activevisium`` strategy, k-means cold start, the MLP head trained with Adam 1e-4 for at
  most 50 epochs (patience 10), no spatial neighbour features, 20 spots per round, 10
  augmented views per spot beside the clean one (11 embedding passes).

The annotation store (what ``CreateProject`` fills in), training (head hyper-parameters)
and ``histoloop simulate`` (the default configuration it compares with random) all read
this module, so a simulated default is the live default.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from histoloop.errors import InvalidArgument
from histoloop.formats.vocab import (
    DEFAULT_AUGMENT_VIEWS,
    DEFAULT_COLD_START,
    DEFAULT_HEAD,
    DEFAULT_QUERY_SIZE,
    DEFAULT_SPATIAL_NEIGHBOURS,
    DEFAULT_STRATEGY,
)

__all__ = ["DEFAULTS", "PRESETS", "head_hyperparameters", "loop_defaults"]

DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "strategy": DEFAULT_STRATEGY,
        "cold_start_strategy": DEFAULT_COLD_START,
        "query_size": DEFAULT_QUERY_SIZE,
        "head": DEFAULT_HEAD,
        "spatial_neighbours": DEFAULT_SPATIAL_NEIGHBOURS,
        "augment_views": DEFAULT_AUGMENT_VIEWS,
    }
)
"""Project defaults (no preset): the loop fields a ``CreateProject`` without them gets.

Chosen on 5-seed campaigns on DLPFC 151510 and HER2+ A1 (benchmarks/README.md, "Defaults
by evidence"): the 6 nearest spots' mean features raised full-supervision macro-F1 from
0.659 to 0.822 (DLPFC) and 0.458 to 0.612 (A1) and the curves' AULC by 0.12–0.19 with
either head. On 30 PCs logistic regression and the (now properly trained) MLP tie; on the
live loop's own expression features (log-normalised genes, no PCA) logistic regression
with entropy collapsed on one seed of three (AULC 0.699 ± 0.159) while the MLP held (0.775
± 0.030 with activevisium, 0.773 with entropy), so the MLP stays. With the MLP the
two-stage activevisium query was at least as good as entropy in all three comparisons.
The bandit beat random but not the best fixed strategy; k-means and coverage cold starts
were split (one section each), so k-means stays; query size was not varied."""

_PAPER_MLP: Mapping[str, Any] = MappingProxyType(
    {
        "lr": 1e-4,
        "batch_size": 16,
        "max_epochs": 50,
        "patience": 10,
        "weight_decay": 0.0,
        "weight_decay_per_label": 0.0,
    }
)

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "activevisium": MappingProxyType(
            {
                "loop": MappingProxyType(
                    {
                        "strategy": "activevisium",
                        "cold_start_strategy": "coldstart_kmeans",
                        "query_size": 20,
                        "head": "mlp",
                        "spatial_neighbours": 0,
                        "augment_views": 10,
                    }
                ),
                "hyperparameters": MappingProxyType(
                    {"mlp": _PAPER_MLP, "multimodal": _PAPER_MLP, "ensemble": _PAPER_MLP}
                ),
            }
        ),
    }
)
"""Named presets: loop fields and per-head hyper-parameters."""


def _check(preset: str) -> str:
    preset = (preset or "").strip()
    if preset and preset not in PRESETS:
        raise InvalidArgument(
            f"config.preset: {preset!r} is not one of '', {', '.join(sorted(PRESETS))}"
        )
    return preset


def loop_defaults(preset: str = "") -> dict[str, Any]:
    """The loop fields an unset ``LoopConfig`` field takes under ``preset``.

    Args:
        preset: ``""`` (the evidence defaults) or a name in :data:`PRESETS`.

    Returns:
        Field name → value (strategy, cold_start_strategy, query_size, head, spatial_neighbours,
        augment_views).

    Raises:
        InvalidArgument: Unknown preset (names ``config.preset``).
    """
    preset = _check(preset)
    return dict(PRESETS[preset]["loop"]) if preset else dict(DEFAULTS)


def head_hyperparameters(preset: str, head: str) -> dict[str, Any]:
    """Hyper-parameters training passes to ``head`` under ``preset`` (empty: the head's own).

    Args:
        preset: ``""`` or a name in :data:`PRESETS`.
        head: Training head name.

    Returns:
        Hyper-parameter overrides for :func:`histoloop.training.heads.make_head`.

    Raises:
        InvalidArgument: Unknown preset (names ``config.preset``).
    """
    preset = _check(preset)
    if not preset:
        return {}
    return dict(PRESETS[preset]["hyperparameters"].get(head, {}))
