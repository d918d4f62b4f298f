"""One round's query set, the same for the live loop and for simulation.

:func:`select_query` is what the acquisition step runs on new predictions (and on the
embeddings for the cold start) and what a simulated campaign runs each round: the
project's strategy with every setting of its ``LoopConfig`` that shapes a query — the
adjudication share, spatial compactness (when the spots have positions) and the
strategy's own options (:func:`~histoloop.acquisition.settings.strategy_options`) —
``query_size`` spots, and a random stream derived one way from the project's seed and the
round (:func:`query_rng`). While the labels cover fewer classes than a model needs, both
ask by :data:`MORE_CLASSES_STRATEGY` instead.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from histoloop.acquisition.settings import strategy_options
from histoloop.acquisition.strategies import QueryContext, Selection, get_strategy
from histoloop.v1 import common_pb2

__all__ = ["MORE_CLASSES_STRATEGY", "query_rng", "select_query"]

MORE_CLASSES_STRATEGY = "coverage"
"""Chooses the spots asked for while the labels cover fewer classes than a model needs
(:data:`~histoloop.labelsets.MIN_TRAINING_CLASSES`): farthest-first from the labelled spots
on the input features, so each set moves away from the class(es) already seen (a k-means
cold start run again would pick typical spots of the same big clusters)."""


def query_rng(seed: int, round_no: int) -> np.random.Generator:
    """The random stream of one round's query (independent across seeds and rounds)."""
    return np.random.default_rng([int(seed), int(round_no)])


def select_query(
    ctx: QueryContext,
    *,
    strategy: str,
    query_size: int,
    seed: int,
    settings: common_pb2.LoopConfig | None = None,
    state: dict[str, Any] | None = None,
) -> Selection:
    """Choose ``query_size`` unlabelled spots.

    Args:
        ctx: The pool: features (the model's hidden features once there is a model),
            labelled mask, probabilities, positions, disagreement and the round.
        strategy: Registry name.
        query_size: Spots to choose.
        seed: The project's seed.
        settings: The project's loop settings: its ``adjudication_share``,
            ``compactness`` (ignored without positions) and the strategy's own options
            (``hybrid_share``, ``kmeans_pick``); None: the defaults.
        state: A stateful strategy's state after the previous round (``Selection.state``
            of that round), None to start afresh.

    Raises:
        UnknownStrategy: no such strategy.
        InvalidArgument: bad settings for it.
    """
    config = settings if settings is not None else common_pb2.LoopConfig()
    chosen = get_strategy(
        strategy,
        adjudication_share=config.adjudication_share,
        compactness=config.compactness if ctx.positions is not None else 0.0,
        **strategy_options(strategy, config),
    )
    chosen.set_state(state)
    selection = chosen.select(ctx, int(query_size), query_rng(seed, ctx.round))
    return dataclasses.replace(selection, state=chosen.get_state())
