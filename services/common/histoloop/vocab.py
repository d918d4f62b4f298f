"""The loop's vocabulary: every name and range a project's ``LoopConfig`` may hold.

One source for the door (the annotation store's ``CreateProject``/``UpdateProject``) and the
services that implement the names (acquisition strategies, training heads and resampling,
the store's consensus rules). Services never import each other, so the names live here;
contract tests (``tests/loop/test_contracts.py``) check that each service's registry
implements exactly these names, so the door can never accept a name that fails later.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "COLD_START_STRATEGIES",
    "CONSENSUS_RULES",
    "FEATURE_SETS",
    "HEADS",
    "MAX_QUERY_SIZE",
    "RESAMPLING",
    "STRATEGIES",
    "STRATEGY_NEEDS_MODEL",
]

STRATEGY_NEEDS_MODEL: Mapping[str, bool] = {
    "activevisium": True,
    "bald": True,
    "coldstart_kmeans": False,
    "coreset": True,
    "entropy": True,
    "hybrid": True,
    "kmeans": True,
    "least_confidence": True,
    "margin": True,
    "random": False,
    "typiclust": False,
}
"""Acquisition strategy name → whether it needs model predictions (``ListStrategies``)."""
STRATEGIES: tuple[str, ...] = tuple(sorted(STRATEGY_NEEDS_MODEL))
"""Names ``config.strategy`` may take (any strategy; the first round uses the cold start)."""
COLD_START_STRATEGIES: tuple[str, ...] = tuple(n for n in STRATEGIES if not STRATEGY_NEEDS_MODEL[n])
"""Names ``config.cold_start_strategy`` may take: strategies that need no model."""
HEADS: tuple[str, ...] = ("mlp", "multimodal", "logreg", "ensemble")
"""Training heads (``config.head``)."""
RESAMPLING: tuple[str, ...] = ("off", "offline", "online")
"""Adaptive resampling modes of training (``config.resampling``)."""
CONSENSUS_RULES: tuple[str, ...] = ("latest_expert", "majority", "dawid_skene")
"""How several annotators' labels of a spot combine (``config.consensus``)."""
FEATURE_SETS: tuple[str, ...] = ("morphology", "expression", "multimodal")
"""What the loop learns from (``config.features``)."""
MAX_QUERY_SIZE = 10_000
"""Largest query set, for a project (``config.query_size``) and a what-if ``Query`` alike."""
