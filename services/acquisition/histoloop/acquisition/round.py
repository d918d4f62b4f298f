"""One round's query set, the same for the live loop and for simulation.

:func:`select_query` is what the acquisition step runs on new predictions (and on the
embeddings for the cold start) and what a simulated campaign runs each round: the
project's strategy with its adjudication share and spatial compactness (when the spots
have positions), ``query_size`` spots, and a random stream derived one way from the
project's seed and the round (:func:`query_rng`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from histoloop.acquisition.strategies import QueryContext, Selection, get_strategy

__all__ = ["query_rng", "select_query"]


def query_rng(seed: int, round_no: int) -> np.random.Generator:
    """The random stream of one round's query (independent across seeds and rounds)."""
    return np.random.default_rng([int(seed), int(round_no)])


def select_query(
    ctx: QueryContext,
    *,
    strategy: str,
    query_size: int,
    seed: int,
    adjudication_share: float = 0.0,
    compactness: float = 0.0,
    options: Mapping[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> Selection:
    """Choose ``query_size`` unlabelled spots.

    Args:
        ctx: The pool: features (the model's hidden features once there is a model),
            labelled mask, probabilities, positions, disagreement and the round.
        strategy: Registry name.
        query_size: Spots to choose.
        seed: The project's seed.
        adjudication_share: Share of the set given to disputed spots.
        compactness: Spatial compactness (ignored without positions).
        options: The strategy's own settings from the project's config
            (:func:`histoloop.acquisition.settings.strategy_options`).
        state: A stateful strategy's state after the previous round (``Selection.state``
            of that round), None to start afresh.

    Raises:
        UnknownStrategy: no such strategy.
        InvalidArgument: bad settings for it.
    """
    chosen = get_strategy(
        strategy,
        adjudication_share=adjudication_share,
        compactness=compactness if ctx.positions is not None else 0.0,
        **(options or {}),
    )
    chosen.set_state(state)
    selection = chosen.select(ctx, int(query_size), query_rng(seed, ctx.round))
    return dataclasses.replace(selection, state=chosen.get_state())
