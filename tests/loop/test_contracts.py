"""Names one service accepts must be names another service implements."""

from __future__ import annotations

from histoloop.annotation_store.domain import HEADS as STORE_HEADS
from histoloop.annotation_store.domain import RESAMPLING as STORE_RESAMPLING
from histoloop.training.heads import HEADS


def test_the_store_accepts_exactly_the_heads_training_implements() -> None:
    assert set(STORE_HEADS) == set(HEADS)


def test_the_store_accepts_exactly_the_resampling_modes_training_implements() -> None:
    import typing

    from histoloop.training.pipeline import ResamplingMode

    assert set(STORE_RESAMPLING) == set(typing.get_args(ResamplingMode))


def test_the_shared_vocabulary_is_exactly_what_the_services_implement() -> None:
    """The door (CreateProject/UpdateProject) checks names against histoloop.formats.vocab."""
    from histoloop.acquisition.strategies import STRATEGIES
    from histoloop.annotation_store.consensus import IncrementalConsensus
    from histoloop.formats import vocab
    from histoloop.training.resampling import RESAMPLING_MODES

    assert dict(vocab.STRATEGY_NEEDS_MODEL) == {n: c.needs_model for n, c in STRATEGIES.items()}
    assert set(vocab.HEADS) == set(HEADS)
    assert set(vocab.RESAMPLING) == set(RESAMPLING_MODES)
    for rule in vocab.CONSENSUS_RULES:
        IncrementalConsensus(rule)  # raises for a rule the store does not implement


def test_every_strategy_is_listed_with_whether_it_needs_a_model() -> None:
    """The vocabulary, ListStrategies and simulation offer exactly these strategies."""
    from histoloop.acquisition.strategies import list_strategies
    from histoloop.formats import vocab
    from histoloop.simulation.campaign import default_strategies

    expected = {
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
    assert dict(vocab.STRATEGY_NEEDS_MODEL) == expected
    assert {s.name: s.needs_model for s in list_strategies()} == expected
    assert "rater_disagreement" in default_strategies("mlp")
