"""A project's ``LoopConfig`` → the options of its strategy and of the stopping signal.

The acquisition and stopping settings of ``LoopConfig`` (fields 30–36) are project-wide;
each strategy takes only those it has a parameter for (``hybrid_share`` → the hybrid's
``share``; ``kmeans_pick`` → ``pick`` of the k-means strategies). Unset (zero/empty)
fields keep the documented defaults:

================== ========================= =======================================
field              default                    meaning
================== ========================= =======================================
hybrid_share       0.7                        hybrid: share chosen by uncertainty
kmeans_pick        closest_to_centroid        or ``far_from_centre``
stop_max_change    0.02                       largest share of changed spots
stop_min_kappa     0.95                       smallest kappa between rounds
stop_patience      2                          consecutive round pairs that must hold
stop_max_uncertainty (unused)                 ceiling on the mean normalised entropy
================== ========================= =======================================

The stopping rule is Bloodgood & Vijay-Shanker's stabilising predictions with a
changed-share condition added. Its defaults come from simulation (``bench_seeds.py --only
stopping``, benchmarks/README.md): with the earlier 0.01 the default MLP's predictions kept
flipping on 1.2–1.8 % of DLPFC's pool every round and the signal never fired (2,300 labels);
0.02 / 0.95 / 2 fired on every run of DLPFC and A1, at 98 % and 95 % of full supervision.
"""

from __future__ import annotations

from typing import Any

from histoloop.formats.vocab import DEFAULT_STOP_MAX_CHANGE
from histoloop.v1 import common_pb2

from .strategies import STRATEGIES, _parameters

__all__ = ["STOPPING_DEFAULTS", "stopping_options", "stopping_rounds", "strategy_options"]

STOPPING_DEFAULTS: dict[str, Any] = {
    "max_change": DEFAULT_STOP_MAX_CHANGE,
    "min_kappa": 0.95,
    "patience": 2,
    "max_uncertainty": None,
}
"""Keyword arguments of :func:`~histoloop.acquisition.stopping.recommend_stop` by default."""


def strategy_options(name: str, config: common_pb2.LoopConfig) -> dict[str, Any]:
    """The strategy parameters the project's settings give ``name``.

    Args:
        name: Registered strategy name (unknown names give ``{}``; the registry reports
            them).
        config: The project's loop settings.

    Returns:
        Keyword parameters for :func:`~histoloop.acquisition.strategies.get_strategy`.
    """
    cls = STRATEGIES.get(name)
    if cls is None:
        return {}
    accepted = _parameters(cls)
    options: dict[str, Any] = {}
    if "share" in accepted and config.hybrid_share > 0:
        options["share"] = float(config.hybrid_share)
    if "pick" in accepted and config.kmeans_pick:
        options["pick"] = config.kmeans_pick
    return options


def stopping_options(config: common_pb2.LoopConfig | None) -> dict[str, Any]:
    """Keyword arguments for ``recommend_stop`` from the project's settings.

    Args:
        config: The project's loop settings, or None (defaults).

    Returns:
        ``max_change``, ``min_kappa``, ``patience`` and ``max_uncertainty``.
    """
    options = dict(STOPPING_DEFAULTS)
    if config is None:
        return options
    if config.stop_max_change > 0:
        options["max_change"] = float(config.stop_max_change)
    if config.stop_min_kappa > 0:
        options["min_kappa"] = float(config.stop_min_kappa)
    if config.stop_patience > 0:
        options["patience"] = int(config.stop_patience)
    if config.stop_max_uncertainty > 0:
        options["max_uncertainty"] = float(config.stop_max_uncertainty)
    return options


STOPPING_HISTORY = 3
"""Rounds of predictions the stopping signal looks at, at least (more with a longer patience)."""


def stopping_rounds(config: common_pb2.LoopConfig | None) -> int:
    """Rounds of predictions (the newest included) the stopping rule needs under ``config``."""
    return max(STOPPING_HISTORY, int(stopping_options(config)["patience"]) + 1)
