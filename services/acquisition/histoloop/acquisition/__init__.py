"""histoloop acquisition service."""

from .stopping import RoundPredictions, StoppingSignal, agreement_kappa, recommend_stop
from .strategies import (
    STRATEGIES,
    QueryContext,
    Selection,
    Strategy,
    StrategyInfo,
    UnknownStrategy,
    get_strategy,
    list_strategies,
    uncertainty,
)

__all__ = [
    "STRATEGIES",
    "QueryContext",
    "RoundPredictions",
    "Selection",
    "StoppingSignal",
    "Strategy",
    "StrategyInfo",
    "UnknownStrategy",
    "agreement_kappa",
    "get_strategy",
    "list_strategies",
    "recommend_stop",
    "uncertainty",
]
