"""Acquisition strategies behind one interface, registered by name.

A strategy is a small class with one method, :meth:`Strategy.select`, that takes a
:class:`QueryContext` (what is known about every spot), a query size ``k`` and a
:class:`numpy.random.Generator`, and returns a :class:`Selection`. Strategies are looked
up by name in :data:`STRATEGIES` through :func:`get_strategy`; an unknown name raises
:class:`UnknownStrategy` (an :class:`~histoloop.errors.InvalidArgument`).

Two options apply to every strategy and are handled by :func:`get_strategy`:

* ``adjudication_share`` (multi-rater): up to this share of the query set goes to
  labelled spots whose annotators disagree most, before new spots are chosen.
* ``compactness`` λ in [0, 1]: trades informativeness for a spatially compact query set
  that is faster to annotate.

All distance work goes through :mod:`histoloop.acquisition.cluster`, in the standardised
space of :func:`histoloop.acquisition.diversity.diversity_space` whatever the head.
"""

from __future__ import annotations

import abc
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from histoloop.errors import FailedPrecondition, InvalidArgument

from . import cluster
from .diversity import diversity_space
from .probcover import probcover_select

__all__ = [
    "KMEANS_PICKS",
    "STRATEGIES",
    "KMeansPick",
    "QueryContext",
    "Selection",
    "Strategy",
    "StrategyInfo",
    "UncertaintyMeasure",
    "UnknownStrategy",
    "get_strategy",
    "list_strategies",
    "uncertainty",
]

log = logging.getLogger(__name__)

UncertaintyMeasure = Literal["least_confidence", "margin", "entropy"]
_MEASURES: tuple[str, ...] = ("least_confidence", "margin", "entropy")
KMeansPick = Literal["closest_to_centroid", "far_from_centre"]
KMEANS_PICKS: tuple[str, ...] = ("closest_to_centroid", "far_from_centre")

# Centres are fitted on at most this many rows per cluster (and at least
# _MIN_FIT_SAMPLES rows); every row is then assigned exactly.
_FIT_SAMPLES_PER_CLUSTER = 100
_MIN_FIT_SAMPLES = 10_000


class UnknownStrategy(InvalidArgument):
    """The requested acquisition strategy name is not registered."""


# --------------------------------------------------------------------------- context


@dataclass(frozen=True, eq=False)
class QueryContext:
    """Everything a strategy may look at, one row per spot.

    Attributes:
        features: ``(n, h)`` features for diversity: the model's hidden features, or the
            foundation-model embeddings at cold start. Pass float32 to avoid a copy.
        labelled: ``(n,)`` bool, True where the spot already has a label.
        probabilities: ``(n, C)`` predicted class probabilities, or None (cold start).
        member_probabilities: ``(M, n, C)`` per-member probabilities of an ensemble, or
            None.
        positions: ``(n, 2)`` spot coordinates (array or pixel), or None.
        disagreement: ``(n,)`` annotator disagreement per spot (0 = consensus), or None.
        round: Active-learning round number (0 = first), used by decaying pools.
        labels: ``(n,)`` int class index of each labelled spot (−1 where unlabelled), in
            the order of ``probabilities``' columns, or None. Only strategies that
            learn from their own past queries (``bandit``) read it.
        rater_disagreement: ``(n,)`` share of annotator pairs whose per-annotator models
            predict different classes for the spot (0 = all agree), or None when the model
            has no per-annotator model. Unlike ``disagreement`` it covers unlabelled spots.
    """

    features: np.ndarray
    labelled: np.ndarray
    probabilities: np.ndarray | None = None
    member_probabilities: np.ndarray | None = None
    positions: np.ndarray | None = None
    disagreement: np.ndarray | None = None
    round: int = 0
    labels: np.ndarray | None = None
    rater_disagreement: np.ndarray | None = None

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        if features.ndim != 2:
            raise InvalidArgument(f"features must be (n, h), got shape {features.shape}")
        n = features.shape[0]
        labelled = np.asarray(self.labelled)
        if labelled.shape != (n,):
            raise InvalidArgument(f"labelled must have shape ({n},), got {labelled.shape}")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "labelled", labelled.astype(bool, copy=False))
        if self.probabilities is not None:
            p = np.asarray(self.probabilities)
            if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
                raise InvalidArgument(f"probabilities must be ({n}, C≥2), got {p.shape}")
            object.__setattr__(self, "probabilities", p)
        if self.member_probabilities is not None:
            mp = np.asarray(self.member_probabilities)
            if mp.ndim != 3 or mp.shape[1] != n or mp.shape[2] < 2:
                raise InvalidArgument(f"member_probabilities must be (M, {n}, C≥2), got {mp.shape}")
            object.__setattr__(self, "member_probabilities", mp)
        if self.positions is not None:
            pos = np.asarray(self.positions, dtype=np.float64)
            if pos.shape != (n, 2):
                raise InvalidArgument(f"positions must be ({n}, 2), got {pos.shape}")
            object.__setattr__(self, "positions", pos)
        for name in ("disagreement", "rater_disagreement"):
            if getattr(self, name) is not None:
                dis = np.asarray(getattr(self, name), dtype=np.float64)
                if dis.shape != (n,):
                    raise InvalidArgument(f"{name} must be ({n},), got {dis.shape}")
                object.__setattr__(self, name, dis)
        if int(self.round) < 0:
            raise InvalidArgument(f"round must be ≥ 0, got {self.round}")
        if self.labels is not None:
            lab = np.asarray(self.labels, dtype=np.int64)
            if lab.shape != (n,):
                raise InvalidArgument(f"labels must be ({n},), got {lab.shape}")
            object.__setattr__(self, "labels", lab)

    @property
    def n(self) -> int:
        """Number of spots."""
        return int(self.features.shape[0])

    @property
    def unlabelled(self) -> np.ndarray:
        """Row indices of spots without a label (int64)."""
        return np.flatnonzero(~self.labelled)


@dataclass(frozen=True, eq=False)
class Selection:
    """A query set.

    Attributes:
        indices: ``(k,)`` int64 spot rows, no duplicates. Unlabelled spots, except rows
            flagged in ``adjudication`` (labelled spots sent back for another opinion).
        scores: ``(k,)`` float64 per selected spot; higher = wanted more (uncertainty,
            distance, typicality… depending on the strategy).
        strategy: Name of the strategy that produced it.
        adjudication: ``(k,)`` bool, True for disputed labelled spots (none given: all False).
        state: What a stateful strategy learnt up to this set (:meth:`Strategy.get_state`),
            for the next round; None for a stateless one.
        note: Why the strategy chose otherwise than its name says (a fallback), or empty.
    """

    indices: np.ndarray
    scores: np.ndarray
    strategy: str
    adjudication: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    state: dict[str, Any] | None = None
    note: str = ""

    def __post_init__(self) -> None:
        idx = np.asarray(self.indices, dtype=np.int64)
        scores = np.asarray(self.scores, dtype=np.float64)
        if idx.ndim != 1 or scores.shape != idx.shape:
            raise ValueError("indices and scores must be 1-D of the same length")
        if len(np.unique(idx)) != len(idx):
            raise ValueError("a selection must not contain duplicates")
        adj = np.asarray(self.adjudication, dtype=bool)
        if adj.size == 0:
            adj = np.zeros(len(idx), dtype=bool)
        object.__setattr__(self, "indices", idx)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "adjudication", adj)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class StrategyInfo:
    """What :func:`list_strategies` reports for one strategy.

    Attributes:
        name: Registry name.
        description: One line.
        needs_model: True when it needs model predictions (not usable at cold start).
        parameters: Keyword parameters and their defaults.
    """

    name: str
    description: str
    needs_model: bool
    parameters: dict[str, Any]


# --------------------------------------------------------------------------- helpers


def uncertainty(probabilities: np.ndarray, measure: UncertaintyMeasure = "entropy") -> np.ndarray:
    """Normalised uncertainty in [0, 1] per row, as in ActiveVisium.

    * least confidence: ``(1 − max p)·C/(C − 1)``
    * margin: ``1 − (p₁ − p₂)`` (top two probabilities)
    * entropy: ``−Σ p log p / log C``

    Args:
        probabilities: ``(n, C)`` class probabilities, ``C ≥ 2``.
        measure: One of ``least_confidence``, ``margin``, ``entropy``.

    Returns:
        ``(n,)`` float32 uncertainty; 1 = uniform, 0 = certain.
    """
    if measure not in _MEASURES:
        raise InvalidArgument(f"unknown uncertainty measure {measure!r}; choose from {_MEASURES}")
    P = np.asarray(probabilities, dtype=np.float32)
    C = P.shape[1]
    if measure == "least_confidence":
        out = (1.0 - P.max(axis=1)) * (C / (C - 1.0))
    elif measure == "margin":
        top2 = np.partition(P, C - 2, axis=1)[:, C - 2 :]
        out = 1.0 - (top2[:, 1] - top2[:, 0])
    else:
        logp = np.log(np.clip(P, 1e-12, 1.0))
        logp *= P
        out = -logp.sum(axis=1) / np.float32(math.log(C))
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _entropy_nats(P: np.ndarray, axis: int = -1) -> np.ndarray:
    logp = np.log(np.clip(P, 1e-12, 1.0))
    logp *= P
    return -logp.sum(axis=axis)


def _top(scores: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` rows with the highest score (ties: lowest row), best first."""
    k = min(k, len(rows))
    if k <= 0:
        return np.empty(0, dtype=np.int64)
    s = scores[rows]
    if k < len(rows):
        part = np.argpartition(-s, k - 1)[:k]
        # include rows tied with the k-th score so that ties break by row index
        kth = s[part].min()
        part = np.flatnonzero(s >= kth)
    else:
        part = np.arange(len(rows))
    order = np.lexsort((rows[part], -s[part]))[:k]
    return rows[part[order]]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InvalidArgument(f"query size k must be a positive integer, got {k!r}")
    return int(k)


def _fit_samples(k: int) -> int:
    return max(_MIN_FIT_SAMPLES, _FIT_SAMPLES_PER_CLUSTER * k)


def _need_probabilities(ctx: QueryContext, name: str) -> np.ndarray:
    if ctx.probabilities is None:
        cold = ", ".join(sorted(n for n, c in STRATEGIES.items() if not c.needs_model))
        raise FailedPrecondition(
            f"strategy {name!r} needs model predictions and none exist yet; "
            f"use a cold-start strategy ({cold})"
        )
    return ctx.probabilities


def _finish(
    ctx: QueryContext,
    name: str,
    k: int,
    rows: np.ndarray,
    scores: np.ndarray,
    rng: np.random.Generator,
    note: str = "",
) -> Selection:
    """Check the invariants and top up with random unlabelled spots if short."""
    rows = np.asarray(rows, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if np.any(ctx.labelled[rows]):
        raise RuntimeError(f"strategy {name!r} selected labelled spots")  # a bug, not input
    want = min(k, int((~ctx.labelled).sum()))
    if len(rows) < want:
        free = np.setdiff1d(ctx.unlabelled, rows)
        extra = rng.choice(free, size=want - len(rows), replace=False)
        log.debug("strategy %s: topped up %d spots at random", name, len(extra))
        rows = np.concatenate([rows, extra])
        scores = np.concatenate([scores, np.zeros(len(extra))])
    return Selection(indices=rows[:want], scores=scores[:want], strategy=name, note=note)


def _representatives(
    X: np.ndarray,
    rows: np.ndarray,
    k: int,
    rng: np.random.Generator,
    pick: str = "closest_to_centroid",
) -> np.ndarray:
    """k-means with ``k`` clusters on ``X[rows]``; one row per cluster.

    ``pick`` = ``closest_to_centroid`` (ActiveVisium: the most representative member) or
    ``far_from_centre`` (the CryoEM seed: the member farthest from its centroid, at the
    cluster's edge).
    """
    if len(rows) <= k:
        return rows
    km = cluster.kmeans(X[rows], k, rng, max_fit_samples=_fit_samples(k))
    d = km.sq_distances if pick == "closest_to_centroid" else -km.sq_distances
    best = cluster.closest_per_cluster(km.labels, d, km.centroids.shape[0])
    return rows[best[best >= 0]]


def _check_pick(pick: str) -> str:
    if pick not in KMEANS_PICKS:
        raise InvalidArgument(f"pick must be one of {KMEANS_PICKS}, got {pick!r}")
    return pick


# --------------------------------------------------------------------------- base


class Strategy(abc.ABC):
    """An acquisition strategy: one method, :meth:`select`.

    Subclasses set ``name``, ``description`` and ``needs_model`` and take their
    parameters as keyword-only constructor arguments.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_model: ClassVar[bool] = False

    @abc.abstractmethod
    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        """Choose up to ``k`` spots to query.

        Args:
            ctx: What is known about every spot.
            k: Query size; the result has ``min(k, #unlabelled)`` spots.
            rng: Source of all randomness (a seed fixes the result).

        Returns:
            The :class:`Selection`, best first where the strategy has an order.
        """

    def get_state(self) -> dict[str, Any] | None:
        """What a stateful strategy learnt so far (plain JSON), or None (stateless).

        The live loop stores it with each query set and the simulation with each round,
        and hands it back through :meth:`set_state` before the next :meth:`select`.
        """
        return None

    def set_state(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`get_state` output (None: start afresh). Stateless: a no-op."""
        del state  # nothing to restore


class _ScoringStrategy(Strategy):
    """A strategy that scores every spot and takes the top ``k``."""

    @abc.abstractmethod
    def score(self, ctx: QueryContext, rng: np.random.Generator) -> np.ndarray:
        """``(n,)`` informativeness of every spot (higher = query first)."""

    def note(self, ctx: QueryContext) -> str:
        """Why :meth:`score` falls back on ``ctx`` (empty: it does not)."""
        del ctx  # most strategies never fall back
        return ""

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        s = self.score(ctx, rng)
        rows = _top(s, ctx.unlabelled, k)
        return _finish(ctx, self.name, k, rows, s[rows], rng, self.note(ctx))


# --------------------------------------------------------------------------- strategies


class RandomStrategy(_ScoringStrategy):
    """Uniformly random unlabelled spots."""

    name = "random"
    description = "uniformly random unlabelled spots (baseline; works at cold start)"
    needs_model = False

    def score(self, ctx: QueryContext, rng: np.random.Generator) -> np.ndarray:
        return rng.random(ctx.n)


class _UncertaintyStrategy(_ScoringStrategy):
    measure: ClassVar[str] = "entropy"
    needs_model = True

    def score(self, ctx: QueryContext, rng: np.random.Generator) -> np.ndarray:
        return uncertainty(_need_probabilities(ctx, self.name), self.measure)  # type: ignore[arg-type]


class LeastConfidence(_UncertaintyStrategy):
    """Least confidence ``(1 − max p)·C/(C − 1)``."""

    name = "least_confidence"
    measure = "least_confidence"
    description = "lowest top-class probability, normalised to [0, 1]"


class Margin(_UncertaintyStrategy):
    """Smallest margin between the two most likely classes."""

    name = "margin"
    measure = "margin"
    description = "smallest gap between the two most likely classes (1 − (p1 − p2))"


class Entropy(_UncertaintyStrategy):
    """Highest predictive entropy, normalised by ``log C``."""

    name = "entropy"
    measure = "entropy"
    description = "highest predictive entropy, normalised by log C"


class BALD(_ScoringStrategy):
    """Mutual information between prediction and model (ensemble disagreement).

    ``I = H(mean_m p_m) − mean_m H(p_m)``, divided by ``log C``. High where members
    disagree confidently, low where every member is equally unsure.
    """

    name = "bald"
    description = (
        "mutual information across ensemble members or MC-dropout passes (BALD); "
        "needs the ensemble head or mc_dropout_samples > 0"
    )
    needs_model = True

    def score(self, ctx: QueryContext, rng: np.random.Generator) -> np.ndarray:
        mp = ctx.member_probabilities
        if mp is None:
            _need_probabilities(ctx, self.name)  # cold start: FailedPrecondition
            raise InvalidArgument(
                "strategy 'bald' needs member_probabilities: train the 'ensemble' head, or "
                "set mc_dropout_samples > 0 with the 'mlp' or 'multimodal' head"
            )
        mp = np.asarray(mp, dtype=np.float32)
        mean = mp.mean(axis=0)
        mi = _entropy_nats(mean) - _entropy_nats(mp).mean(axis=0)
        return np.clip(mi / math.log(mp.shape[2]), 0.0, 1.0)


class RaterDisagreement(_ScoringStrategy):
    """Where the annotators' own models disagree most (AESPA's per-annotator models).

    Ranks the unlabelled spots by ``ctx.rater_disagreement`` — the share of annotator pairs
    whose per-annotator models predict different classes — ties broken by the consensus
    model's normalised entropy (weighted by ``1e-3``, so it never outranks one more
    disagreeing pair). Without a per-annotator model (labels from fewer than two
    annotators) it falls back to entropy and says so in :attr:`Selection.note`.
    """

    name = "rater_disagreement"
    description = (
        "where the annotators' per-annotator models disagree most (ties: entropy); "
        "entropy until two annotators have labelled"
    )
    needs_model = True
    _TIE_BREAK = 1e-3

    def note(self, ctx: QueryContext) -> str:
        if ctx.rater_disagreement is not None:
            return ""
        return (
            "rater_disagreement: the model has no per-annotator model (labels from fewer than two "
            "annotators); ranked by entropy instead"
        )

    def score(self, ctx: QueryContext, rng: np.random.Generator) -> np.ndarray:
        u = uncertainty(_need_probabilities(ctx, self.name), "entropy").astype(np.float64)
        if ctx.rater_disagreement is None:
            return u
        return ctx.rater_disagreement + self._TIE_BREAK * u


class KMeansDiversity(Strategy):
    """k-means with k = query size on the features; one spot per cluster.

    Args:
        pick: ``closest_to_centroid`` (ActiveVisium) or ``far_from_centre`` (CryoEM seed).
    """

    name = "kmeans"
    description = "k-means (k = query size) on hidden features, closest spot per centroid"
    needs_model = True

    def __init__(self, *, pick: KMeansPick = "closest_to_centroid") -> None:
        self.pick = _check_pick(pick)

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        rows = ctx.unlabelled
        X = diversity_space(ctx.features)
        reps = _representatives(X, rows, k, rng, self.pick)
        return _finish(ctx, self.name, k, reps, np.ones(len(reps)), rng)


class KMeansFarFromCentre(KMeansDiversity):
    """:class:`KMeansDiversity` taking the spot farthest from each centroid."""

    name = "kmeans_far"
    description = "k-means (k = query size) on hidden features, farthest spot from each centre"

    def __init__(self, *, pick: KMeansPick = "far_from_centre") -> None:
        super().__init__(pick=pick)


class ColdStartKMeans(KMeansDiversity):
    """ActiveVisium's initial selection: k-means on the foundation-model embeddings."""

    name = "coldstart_kmeans"
    description = "cold start: k-means on foundation-model embeddings, closest spot per centroid"
    needs_model = False


class CoreSet(Strategy):
    """Greedy k-center (core-set) with the labelled spots as initial centres."""

    name = "coreset"
    description = "k-center greedy core-set on hidden features, labelled spots as centres"
    needs_model = True

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        X = diversity_space(ctx.features)
        rows, d = cluster.kcenter_greedy(
            X, k, rng, centres=np.flatnonzero(ctx.labelled), eligible=~ctx.labelled
        )
        return _finish(ctx, self.name, k, rows, np.sqrt(d), rng)


class Coverage(CoreSet):
    """Greedy k-center on the input features: a cold start that covers the feature space.

    Farthest-first picks reach the outskirts of the feature space, where a class of a few
    spots lives, before they fill in the dense middle (k-means and TypiClust cold starts
    pick typical spots of the big clusters instead).
    """

    name = "coverage"
    description = "k-center greedy on the embeddings (cold start that covers the feature space; finds rare classes)"
    needs_model = False


class ActiveVisium(Strategy):
    """ActiveVisium two-stage query: most uncertain pool, then k-means for diversity.

    The pool is the ``top_fraction`` most uncertain unlabelled spots (at least ``k``);
    with ``decay`` set the fraction shrinks each round as ``top_fraction·decay**round``.
    k-means with ``k`` clusters on the pool's hidden features keeps the spot closest to
    each centroid.

    Args:
        measure: Uncertainty measure for the pool.
        top_fraction: Share of the unlabelled spots kept in the pool (0, 1].
        decay: Per-round factor in (0, 1] for the pool share, or None (constant).
        pick: ``closest_to_centroid`` (the paper) or ``far_from_centre``.
    """

    name = "activevisium"
    description = "ActiveVisium: top 5 % most uncertain, then k-means, closest per centroid"
    needs_model = True

    def __init__(
        self,
        *,
        measure: UncertaintyMeasure = "entropy",
        top_fraction: float = 0.05,
        decay: float | None = None,
        pick: KMeansPick = "closest_to_centroid",
    ) -> None:
        self.pick = _check_pick(pick)
        if measure not in _MEASURES:
            raise InvalidArgument(f"measure must be one of {_MEASURES}, got {measure!r}")
        if not 0.0 < float(top_fraction) <= 1.0:
            raise InvalidArgument(f"top_fraction must be in (0, 1], got {top_fraction}")
        if decay is not None and not 0.0 < float(decay) <= 1.0:
            raise InvalidArgument(f"decay must be in (0, 1], got {decay}")
        self.measure = measure
        self.top_fraction = float(top_fraction)
        self.decay = None if decay is None else float(decay)

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        u = uncertainty(_need_probabilities(ctx, self.name), self.measure)
        rows = ctx.unlabelled
        fraction = self.top_fraction * (self.decay**ctx.round if self.decay else 1.0)
        pool = _top(u, rows, max(k, math.ceil(fraction * len(rows))))
        X = diversity_space(ctx.features)
        reps = _representatives(X, pool, k, rng, self.pick)
        if len(reps) < min(k, len(pool)):  # empty clusters: fill with the most uncertain
            reps = np.concatenate([reps, _top(u, np.setdiff1d(pool, reps), k - len(reps))])
        return _finish(ctx, self.name, k, reps, u[reps], rng)


class Hybrid(Strategy):
    """A share of the query by uncertainty, the rest by k-center diversity.

    Args:
        share: Share of ``k`` chosen by uncertainty (rounded), in [0, 1].
        measure: Uncertainty measure.
    """

    name = "hybrid"
    description = "share (0.7) by uncertainty, the rest by k-center over the remaining spots"
    needs_model = True

    def __init__(self, *, share: float = 0.7, measure: UncertaintyMeasure = "entropy") -> None:
        if not 0.0 <= float(share) <= 1.0:
            raise InvalidArgument(f"share must be in [0, 1], got {share}")
        if measure not in _MEASURES:
            raise InvalidArgument(f"measure must be one of {_MEASURES}, got {measure!r}")
        self.share = float(share)
        self.measure = measure

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        u = uncertainty(_need_probabilities(ctx, self.name), self.measure)
        rows = ctx.unlabelled
        first = _top(u, rows, int(round(self.share * k)))
        eligible = ~ctx.labelled
        eligible[first] = False
        centres = np.concatenate([np.flatnonzero(ctx.labelled), first])
        X = diversity_space(ctx.features)
        rest, _ = cluster.kcenter_greedy(X, k - len(first), rng, centres=centres, eligible=eligible)
        picked = np.concatenate([first, rest])
        return _finish(ctx, self.name, k, picked, u[picked], rng)


class TypiClust(Strategy):
    """TypiClust (Hacohen et al., 2022): typical spots of the largest uncovered clusters.

    k-means into ``min(#labelled + k, max_clusters)`` clusters on the features; then,
    ``k`` times, take the cluster with the fewest labelled/chosen spots (largest first,
    clusters smaller than ``min_cluster_size`` last) and pick its most typical
    unlabelled spot, typicality being the inverse mean distance to the
    ``n_neighbors`` nearest cluster members. For speed, typicality is evaluated for at
    most ``max_candidates`` random unlabelled members against at most
    ``max_reference`` random members of a cluster.

    Args:
        n_neighbors: Neighbours for typicality (paper: 20).
        max_clusters: Cap on the number of clusters (paper: 500).
        min_cluster_size: Clusters smaller than this are used last (paper: 5).
        max_candidates: Members scored per cluster.
        max_reference: Members used as the neighbour reference per cluster.
    """

    name = "typiclust"
    description = "cold start: most typical spot of each largest uncovered k-means cluster"
    needs_model = False

    def __init__(
        self,
        *,
        n_neighbors: int = 20,
        max_clusters: int = 500,
        min_cluster_size: int = 5,
        max_candidates: int = 500,
        max_reference: int = 5000,
    ) -> None:
        for label, value in (
            ("n_neighbors", n_neighbors),
            ("max_clusters", max_clusters),
            ("min_cluster_size", min_cluster_size),
            ("max_candidates", max_candidates),
            ("max_reference", max_reference),
        ):
            if int(value) < 1:
                raise InvalidArgument(f"{label} must be ≥ 1, got {value}")
        self.n_neighbors = int(n_neighbors)
        self.max_clusters = int(max_clusters)
        self.min_cluster_size = int(min_cluster_size)
        self.max_candidates = int(max_candidates)
        self.max_reference = int(max_reference)

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        X = diversity_space(ctx.features)
        x_sq = cluster.row_sq_norms(X)
        n_clusters = min(int(ctx.labelled.sum()) + k, self.max_clusters, ctx.n)
        km = cluster.kmeans(X, n_clusters, rng, max_fit_samples=_fit_samples(n_clusters), x_sq=x_sq)
        n_clusters = km.centroids.shape[0]
        sizes = np.bincount(km.labels, minlength=n_clusters)
        covered = np.bincount(km.labels[ctx.labelled], minlength=n_clusters)
        order = np.argsort(km.labels, kind="stable")
        bounds = np.r_[0, np.cumsum(sizes)]
        taken = ctx.labelled.copy()
        exhausted = np.zeros(n_clusters, dtype=bool)
        picked: list[int] = []
        scores: list[float] = []
        want = min(k, int((~ctx.labelled).sum()))
        while len(picked) < want and not exhausted.all():
            small = sizes < self.min_cluster_size
            key = np.lexsort((-sizes, covered, small | exhausted))
            c = int(key[0])
            members = order[bounds[c] : bounds[c + 1]]
            free = members[~taken[members]]
            if len(free) == 0:
                exhausted[c] = True
                continue
            cand = (
                free
                if len(free) <= self.max_candidates
                else rng.choice(free, size=self.max_candidates, replace=False)
            )
            ref = members
            if len(members) > self.max_reference:
                ref = np.union1d(cand, rng.choice(members, size=self.max_reference, replace=False))
            typ = cluster.typicality(X, ref, cand, n_neighbors=self.n_neighbors, x_sq=x_sq)
            best = int(np.lexsort((cand, -typ))[0])
            row = int(cand[best])
            picked.append(row)
            scores.append(float(typ[best]))
            taken[row] = True
            covered[c] += 1
        return _finish(
            ctx, self.name, k, np.asarray(picked, dtype=np.int64), np.asarray(scores), rng
        )


class ProbCover(Strategy):
    """ProbCover cold start: greedy maximum coverage of δ-balls (Yehuda et al., 2022).

    See :mod:`histoloop.acquisition.probcover`. Labelled spots count as covered, so it
    also works after the cold start (on whatever features the context holds).

    Args:
        purity: α: δ is the largest radius whose balls are pure for this share of the
            spots against k-means pseudo-labels (paper: 0.95).
        n_clusters: k-means pseudo-classes (0 = one per query spot, at least 2).
        delta: Fixed radius in the unit-normalised space (0 = from ``purity``).
        max_points: Coverage is computed over at most this many spots.
    """

    name = "probcover"
    description = "cold start: greedy max coverage of δ-balls, δ from k-means purity (α = 0.95)"
    needs_model = False

    def __init__(
        self,
        *,
        purity: float = 0.95,
        n_clusters: int = 0,
        delta: float = 0.0,
        max_points: int = 20_000,
    ) -> None:
        if not 0.0 < float(purity) < 1.0:
            raise InvalidArgument(f"purity must be in (0, 1), got {purity}")
        if int(n_clusters) < 0 or float(delta) < 0 or int(max_points) < 2:
            raise InvalidArgument("n_clusters and delta must be ≥ 0 and max_points ≥ 2")
        self.purity = float(purity)
        self.n_clusters = int(n_clusters)
        self.delta = float(delta)
        self.max_points = int(max_points)

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        plan = probcover_select(
            ctx.features,
            ctx.labelled,
            k,
            rng,
            purity=self.purity,
            n_clusters=self.n_clusters,
            delta=self.delta,
            max_points=self.max_points,
        )
        log.debug(
            "probcover: delta %.4f, coverage %.3f after %d picks",
            plan.delta,
            plan.coverage,
            len(plan.rows),
        )
        return _finish(ctx, self.name, k, plan.rows, plan.gains.astype(np.float64), rng)


# --------------------------------------------------------------------------- wrappers


class _Adjudicating(Strategy):
    """Puts the most disputed labelled spots first, up to ``share`` of the query."""

    def get_state(self) -> dict[str, Any] | None:
        return self.inner.get_state()

    def set_state(self, state: dict[str, Any] | None) -> None:
        self.inner.set_state(state)

    def __init__(self, inner: Strategy, share: float, min_disagreement: float = 0.0) -> None:
        self.inner = inner
        self.share = share
        self.min_disagreement = min_disagreement
        self.name = inner.name  # type: ignore[misc]
        self.needs_model = inner.needs_model  # type: ignore[misc]

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        quota = int(math.floor(self.share * k + 1e-9))
        disagreement = ctx.disagreement
        disputed = np.empty(0, dtype=np.int64)
        if quota and disagreement is None:
            log.debug("adjudication requested but no disagreement given; skipping")
        elif quota and disagreement is not None:
            mask = ctx.labelled & (disagreement > self.min_disagreement)
            disputed = _top(disagreement, np.flatnonzero(mask), quota)
        disputed_scores = (
            disagreement[disputed] if disagreement is not None else np.empty(0, dtype=np.float64)
        )
        if k <= len(disputed):
            return Selection(disputed, disputed_scores, self.name, np.ones(len(disputed), bool))
        rest = self.inner.select(ctx, k - len(disputed), rng)
        return Selection(
            indices=np.concatenate([disputed, rest.indices]),
            scores=np.concatenate([disputed_scores, rest.scores]),
            strategy=self.name,
            adjudication=np.r_[np.ones(len(disputed), bool), rest.adjudication],
            note=rest.note,
        )


class _Compact(Strategy):
    """Trades informativeness for spatial compactness (λ = ``compactness``).

    Candidates are the ``candidate_factor·k`` most informative unlabelled spots (by the
    inner strategy's per-spot score, or its ranked selection of that size). Starting
    from the most informative, each next spot maximises
    ``(1 − λ)·informativeness_rank − λ·distance_to_chosen / extent`` where the rank is
    in [0, 1] (1 = most informative) and the extent is the diagonal of the candidates'
    bounding box.
    """

    def get_state(self) -> dict[str, Any] | None:
        return self.inner.get_state()

    def set_state(self, state: dict[str, Any] | None) -> None:
        self.inner.set_state(state)

    def __init__(self, inner: Strategy, compactness: float, candidate_factor: int = 10) -> None:
        self.inner = inner
        self.lam = compactness
        self.candidate_factor = candidate_factor
        self.name = inner.name  # type: ignore[misc]
        self.needs_model = inner.needs_model  # type: ignore[misc]

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        k = _check_k(k)
        if ctx.positions is None:
            raise InvalidArgument("compactness > 0 needs spot positions in the query context")
        m = min(len(ctx.unlabelled), self.candidate_factor * k)
        if isinstance(self.inner, _ScoringStrategy):
            s = self.inner.score(ctx, rng)
            cand = _top(s, ctx.unlabelled, m)
            cand_scores, note = s[cand], self.inner.note(ctx)
        else:
            sel = self.inner.select(ctx, m, rng)
            order = np.lexsort((sel.indices, -sel.scores))
            cand, cand_scores, note = sel.indices[order], sel.scores[order], sel.note
        if len(cand) <= k:
            return _finish(ctx, self.name, k, cand, cand_scores, rng, note)
        rank = 1.0 - np.arange(len(cand)) / (len(cand) - 1.0)
        pos = ctx.positions[cand]
        extent = float(np.linalg.norm(pos.max(axis=0) - pos.min(axis=0))) or 1.0
        chosen = [0]
        dmin = np.linalg.norm(pos - pos[0], axis=1) / extent
        open_ = np.ones(len(cand), dtype=bool)
        open_[0] = False
        for _ in range(k - 1):
            obj = (1.0 - self.lam) * rank - self.lam * dmin
            obj[~open_] = -np.inf
            j = int(np.argmax(obj))
            chosen.append(j)
            open_[j] = False
            np.minimum(dmin, np.linalg.norm(pos - pos[j], axis=1) / extent, out=dmin)
        idx = np.asarray(chosen)
        return _finish(ctx, self.name, k, cand[idx], cand_scores[idx], rng, note)


# --------------------------------------------------------------------------- registry

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RandomStrategy,
        LeastConfidence,
        Margin,
        Entropy,
        BALD,
        RaterDisagreement,
        KMeansDiversity,
        KMeansFarFromCentre,
        CoreSet,
        Coverage,
        ActiveVisium,
        Hybrid,
        ColdStartKMeans,
        TypiClust,
        ProbCover,
    )
}
"""Registry: strategy name → class."""


def _parameters(cls: type[Strategy]) -> dict[str, Any]:
    init: Callable[..., Any] = cls.__init__
    if init is object.__init__:
        return {}
    sig = inspect.signature(init)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def list_strategies() -> list[StrategyInfo]:
    """Every registered strategy with a one-line description.

    Returns:
        One :class:`StrategyInfo` per strategy, sorted by name. Every strategy also
        accepts ``adjudication_share`` and ``compactness`` (see :func:`get_strategy`).
    """
    return [
        StrategyInfo(
            name=name,
            description=cls.description,
            needs_model=cls.needs_model,
            parameters=_parameters(cls),
        )
        for name, cls in sorted(STRATEGIES.items())
    ]


def get_strategy(
    name: str,
    *,
    adjudication_share: float = 0.0,
    compactness: float = 0.0,
    **params: Any,
) -> Strategy:
    """Build a registered strategy.

    Args:
        name: Registry name (see :func:`list_strategies`).
        adjudication_share: Share in [0, 1] of the query set reserved for labelled
            spots with annotator disagreement (highest first); 0 = off.
        compactness: λ in [0, 1] trading informativeness for spatial compactness;
            0 = off. Needs ``positions`` in the context.
        **params: The strategy's own keyword parameters.

    Returns:
        A ready :class:`Strategy`.

    Raises:
        UnknownStrategy: ``name`` is not registered (the message lists the choices).
        InvalidArgument: A parameter is unknown or out of range.
    """
    try:
        cls = STRATEGIES[name]
    except (KeyError, TypeError):
        raise UnknownStrategy(
            f"unknown acquisition strategy {name!r}; choose from {', '.join(sorted(STRATEGIES))}"
        ) from None
    allowed = _parameters(cls)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise InvalidArgument(
            f"strategy {name!r} has no parameter(s) {unknown}; it accepts "
            f"{sorted(allowed) or 'none'} plus adjudication_share and compactness"
        )
    if not 0.0 <= float(adjudication_share) <= 1.0:
        raise InvalidArgument(f"adjudication_share must be in [0, 1], got {adjudication_share}")
    if not 0.0 <= float(compactness) <= 1.0:
        raise InvalidArgument(f"compactness must be in [0, 1], got {compactness}")
    strategy: Strategy = cls(**params)
    if compactness > 0:
        strategy = _Compact(strategy, float(compactness))
    if adjudication_share > 0:
        strategy = _Adjudicating(strategy, float(adjudication_share))
    return strategy


from . import bandit as _bandit  # noqa: E402, F401  (registers "bandit"; it builds on the above)
