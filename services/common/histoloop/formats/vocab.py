"""The loop's vocabularies and defaults, stated once.

The annotation store validates a project's ``LoopConfig`` against these names; training
and acquisition take their defaults from here. A contract test checks that training
implements exactly :data:`HEADS` and :data:`RESAMPLING_MODES`. Strategy names are not
listed here: the acquisition registry (``ListStrategies``) owns them.

Defaults follow ActiveVisium: the ``activevisium`` strategy, k-means cold start, 20 spots
per round, the MLP head on image embeddings, no resampling, ``latest_expert`` consensus.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "CONSENSUS_RULES",
    "DEFAULT_COLD_START",
    "DEFAULT_CONSENSUS",
    "DEFAULT_FEATURES",
    "DEFAULT_HEAD",
    "DEFAULT_QUERY_SIZE",
    "DEFAULT_RESAMPLING",
    "DEFAULT_STRATEGY",
    "FEATURE_SETS",
    "HEADS",
    "RESAMPLING_MODES",
    "ConsensusRule",
    "ResamplingMode",
]

ConsensusRule = Literal["latest_expert", "majority", "dawid_skene"]
ResamplingMode = Literal["off", "offline", "online"]

HEADS: tuple[str, ...] = ("mlp", "multimodal", "logreg", "ensemble")
"""Classifier heads training implements."""
RESAMPLING_MODES: tuple[str, ...] = ("off", "offline", "online")
"""Adaptive resampling of the training set: off, once per fit, or every epoch."""
CONSENSUS_RULES: tuple[str, ...] = ("latest_expert", "majority", "dawid_skene")
"""How several annotators' labels of a spot become one training label."""
FEATURE_SETS: tuple[str, ...] = ("morphology", "expression", "multimodal")
"""Which embeddings a model trains on (``LoopConfig.features``)."""

DEFAULT_STRATEGY = "activevisium"
DEFAULT_COLD_START = "coldstart_kmeans"
DEFAULT_QUERY_SIZE = 20
DEFAULT_HEAD = "mlp"
DEFAULT_FEATURES = "morphology"
DEFAULT_RESAMPLING = "off"
DEFAULT_CONSENSUS = "latest_expert"
