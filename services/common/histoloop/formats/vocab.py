"""The loop's vocabularies and defaults, stated once.

One source for the door (the annotation store's ``CreateProject``/``UpdateProject``) and the
services that implement the names (acquisition strategies, training heads and resampling,
the store's consensus rules); training and acquisition take their defaults from here.
Services never import each other, so the names live here; contract tests
(``tests/loop/test_contracts.py``) check that each service's registry implements exactly
these names, so the door can never accept a name that fails later.

Defaults are chosen by evidence (``histoloop.presets`` says which campaigns): the
``activevisium`` strategy, k-means cold start, 20 spots per round, the MLP head on image
embeddings with the 6 nearest units' mean features, no resampling, ``latest_expert``
consensus. The paper's settings are the ``activevisium`` preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

__all__ = [
    "COLD_START_STRATEGIES",
    "DEFAULT_AUGMENT_VIEWS",
    "MAX_AUGMENT_VIEWS",
    "CONSENSUS_RULES",
    "DEFAULT_COLD_START",
    "DEFAULT_CONSENSUS",
    "DEFAULT_FEATURES",
    "DEFAULT_HEAD",
    "DEFAULT_QUERY_SIZE",
    "DEFAULT_RESAMPLING",
    "DEFAULT_SPATIAL_NEIGHBOURS",
    "DEFAULT_STOP_MAX_CHANGE",
    "DEFAULT_STRATEGY",
    "FEATURE_SETS",
    "HEADS",
    "MAX_QUERY_SIZE",
    "RESAMPLING",
    "RESAMPLING_MODES",
    "STRATEGIES",
    "STRATEGY_NEEDS_MODEL",
    "ConsensusRule",
    "ResamplingMode",
]

ConsensusRule = Literal["latest_expert", "majority", "dawid_skene"]
ResamplingMode = Literal["off", "offline", "online"]

HEADS: tuple[str, ...] = ("mlp", "multimodal", "logreg", "ensemble")
"""Classifier heads training implements."""
RESAMPLING_MODES: tuple[str, ...] = ("off", "offline", "online")
"""Adaptive resampling of the training set: off, once per fit, or every epoch."""
RESAMPLING = RESAMPLING_MODES
CONSENSUS_RULES: tuple[str, ...] = ("latest_expert", "majority", "dawid_skene")
"""How several annotators' labels of a spot become one training label."""
FEATURE_SETS: tuple[str, ...] = ("morphology", "expression", "multimodal")
"""Which embeddings a model trains on (``LoopConfig.features``)."""

STRATEGY_NEEDS_MODEL: Mapping[str, bool] = {
    "activevisium": True,
    "bald": True,
    "bandit": True,
    "coldstart_kmeans": False,
    "coverage": False,
    "coreset": True,
    "entropy": True,
    "hybrid": True,
    "kmeans": True,
    "kmeans_far": True,
    "least_confidence": True,
    "margin": True,
    "probcover": False,
    "random": False,
    "rater_disagreement": True,
    "typiclust": False,
}
"""Acquisition strategy name → whether it needs model predictions (``ListStrategies``)."""
STRATEGIES: tuple[str, ...] = tuple(sorted(STRATEGY_NEEDS_MODEL))
"""Names ``config.strategy`` may take (any strategy; the first round uses the cold start)."""
COLD_START_STRATEGIES: tuple[str, ...] = tuple(n for n in STRATEGIES if not STRATEGY_NEEDS_MODEL[n])
"""Names ``config.cold_start_strategy`` may take: strategies that need no model."""
MAX_QUERY_SIZE = 10_000
"""Largest query set, for a project (``config.query_size``) and a what-if ``Query`` alike."""

DEFAULT_STRATEGY = "activevisium"
DEFAULT_COLD_START = "coldstart_kmeans"
DEFAULT_QUERY_SIZE = 20
DEFAULT_HEAD = "mlp"
DEFAULT_AUGMENT_VIEWS = 0
"""Augmented views per spot beside the clean one. Off by evidence: on HER2+ A1 the seed's
views (with pixel noise) cost 0.15–0.18 macro-F1 on every seed and noise-free ones were
neutral (``benchmarks/README.md``); the ``activevisium`` preset keeps the paper's 10."""
MAX_AUGMENT_VIEWS = 32
DEFAULT_SPATIAL_NEIGHBOURS = 6
"""Neighbour-mean features of the 6 nearest units (chosen by evidence: ``histoloop.presets``)."""
DEFAULT_FEATURES = "morphology"
DEFAULT_RESAMPLING = "off"
DEFAULT_CONSENSUS = "latest_expert"
DEFAULT_STOP_MAX_CHANGE = 0.02
"""Stopping: the largest share of units whose predicted class may change between rounds.
By simulation (``bench_seeds.py --only stopping``): at 0.01 the default MLP's predictions
kept changing on 1.2–1.8 % of DLPFC's pool every round and the signal never fired."""
