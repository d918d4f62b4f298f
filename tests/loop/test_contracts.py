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
