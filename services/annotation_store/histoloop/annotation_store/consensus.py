"""Consensus of several annotators: one training label per spot, and how much they disagree.

Every label event is kept; for consensus each annotator counts once per spot, with their
*latest* label (a correction replaces the annotator's own earlier label). Three rules:

``latest_expert``
    The latest label from a designated expert (role ``expert`` or ``admin``); if no
    expert labelled the spot, the latest label from anyone. With one pathologist this is
    simply "the latest label wins" (ActiveVisium's single-annotator setting).
``majority``
    The most frequent label; ties go to the label an expert gave, then to the most
    recently given one.
``dawid_skene``
    Dawid & Skene (1979) EM: each annotator gets a confusion matrix (their estimated
    reliability per class), the spot's label is the most probable true class given every
    annotator's label. Initialised from the majority vote; deterministic.

Disagreement of a spot is ``1 - (annotators agreeing with the consensus) / annotators``;
a spot is *disputed* when its annotators gave more than one distinct label.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from histoloop.errors import InvalidArgument

__all__ = [
    "ConsensusLabel",
    "ConsensusResult",
    "IncrementalConsensus",
    "Item",
    "Vote",
    "compute_consensus",
    "dawid_skene",
    "latest_votes",
]

Item = tuple[str, str]
"""A labelled unit: ``(dataset, barcode)``."""


@dataclass(frozen=True)
class Vote:
    """One label event as consensus sees it."""

    item: Item
    """The unit, ``(dataset, barcode)``."""
    annotator: str
    label: str
    seq: int
    """Commit order (the label event id): larger is later."""
    expert: bool = False


@dataclass(frozen=True)
class ConsensusLabel:
    """The training label of one spot."""

    label: str
    disagreement: float
    n_annotators: int
    disputed: bool
    votes: tuple[tuple[str, str], ...] = ()
    """Each annotator's latest label of the spot, ``(annotator, label)`` sorted by annotator
    (what the per-annotator models train on)."""


@dataclass(frozen=True)
class ConsensusResult:
    """Consensus labels per spot, and (Dawid–Skene only) annotator reliabilities."""

    labels: dict[Item, ConsensusLabel]
    reliability: dict[str, float]


def latest_votes(votes: Iterable[Vote]) -> dict[Item, dict[str, Vote]]:
    """Each annotator's latest vote per item: ``item → annotator → vote``."""
    latest: dict[Item, dict[str, Vote]] = defaultdict(dict)
    for vote in votes:
        mine = latest[vote.item]
        held = mine.get(vote.annotator)
        if held is None or vote.seq > held.seq:
            mine[vote.annotator] = vote
    return dict(latest)


def compute_consensus(votes: Iterable[Vote], rule: str) -> ConsensusResult:
    """The training label and disagreement of every voted item under ``rule``.

    Raises:
        InvalidArgument: an unknown rule.
    """
    incremental = IncrementalConsensus(rule)
    incremental.add(votes)
    return incremental.result()


class IncrementalConsensus:
    """Consensus kept up to date as votes arrive (the outbox relay's per-version snapshots).

    ``latest_expert`` and ``majority`` are per spot, so only spots that got a vote are
    recomputed; ``dawid_skene`` couples all spots and is recomputed in full (from memory).
    :func:`compute_consensus` is this class fed all votes at once, so both agree exactly.
    """

    def __init__(self, rule: str) -> None:
        """Start empty.

        Raises:
            InvalidArgument: an unknown rule.
        """
        if rule not in ("latest_expert", "majority", "dawid_skene"):
            raise InvalidArgument(
                f"unknown consensus rule {rule!r} (latest_expert, majority, dawid_skene)"
            )
        self.rule = rule
        self._latest: dict[Item, dict[str, Vote]] = {}
        self._labels: dict[Item, ConsensusLabel] = {}
        self._reliability: dict[str, float] = {}
        self._dirty: set[Item] = set()

    def add(self, votes: Iterable[Vote]) -> None:
        """Take more votes (a later vote of the same annotator replaces the earlier one)."""
        for vote in votes:
            mine = self._latest.setdefault(vote.item, {})
            held = mine.get(vote.annotator)
            if held is None or vote.seq > held.seq:
                mine[vote.annotator] = vote
                self._dirty.add(vote.item)

    def refresh(self) -> dict[Item, ConsensusLabel]:
        """Recompute what the new votes touched; return those items' consensus."""
        if not self._dirty:
            return {}
        if self.rule == "dawid_skene":
            chosen, self._reliability = dawid_skene(self._latest)
            self._labels = {item: _describe(chosen[item], v) for item, v in self._latest.items()}
            changed = dict(self._labels)
        else:
            pick = _latest_expert if self.rule == "latest_expert" else _majority
            changed = {}
            for item in self._dirty:
                votes = self._latest[item]
                changed[item] = self._labels[item] = _describe(pick(votes), votes)
        self._dirty.clear()
        return changed

    def result(self) -> ConsensusResult:
        """The consensus of every item voted on so far."""
        self.refresh()
        return ConsensusResult(labels=dict(self._labels), reliability=dict(self._reliability))


def _describe(label: str, votes: Mapping[str, Vote]) -> ConsensusLabel:
    n = len(votes)
    agree = sum(1 for v in votes.values() if v.label == label)
    distinct = len({v.label for v in votes.values()})
    return ConsensusLabel(
        label=label,
        disagreement=1.0 - agree / n,
        n_annotators=n,
        disputed=distinct > 1,
        votes=tuple(sorted((a, v.label) for a, v in votes.items())),
    )


def _latest_expert(votes: Mapping[str, Vote]) -> str:
    experts = [v for v in votes.values() if v.expert]
    pool = experts or list(votes.values())
    return max(pool, key=lambda v: v.seq).label


def _majority(votes: Mapping[str, Vote]) -> str:
    counts = Counter(v.label for v in votes.values())
    best = max(counts.values())
    tied = {label for label, c in counts.items() if c == best}
    if len(tied) == 1:
        return next(iter(tied))
    candidates = [v for v in votes.values() if v.label in tied]
    # an expert's label wins a tie, then the most recent one
    return max(candidates, key=lambda v: (v.expert, v.seq)).label


def dawid_skene(
    per_item: Mapping[Item, Mapping[str, Vote]],
    *,
    max_iter: int = 100,
    tol: float = 1e-6,
    smoothing: float = 0.01,
    diagonal_prior: float = 1.0,
) -> tuple[dict[Item, str], dict[str, float]]:
    """Dawid–Skene EM over each annotator's latest label per item.

    Args:
        per_item: ``item → annotator → vote`` (see :func:`latest_votes`).
        max_iter: EM iterations at most.
        tol: stop when no class posterior moves more than this.
        smoothing: pseudo-count added to every confusion-matrix cell.
        diagonal_prior: extra pseudo-count on the diagonal — the prior belief that an
            annotator is usually right; it keeps EM from drifting to the uninformative
            fixed point when an annotator has few or no co-raters.

    Returns:
        The most probable class per item, and each annotator's estimated accuracy
        (``Σ_k prior_k · π_annotator[k, k]``).
    """
    items = list(per_item)
    if not items:
        return {}, {}
    classes = sorted({v.label for votes in per_item.values() for v in votes.values()})
    annotators = sorted({a for votes in per_item.values() for a in votes})
    c_index = {c: i for i, c in enumerate(classes)}
    a_index = {a: i for i, a in enumerate(annotators)}
    n_items, n_ann, n_cls = len(items), len(annotators), len(classes)

    obs_item, obs_ann, obs_lab = [], [], []
    for i, item in enumerate(items):
        for a, vote in per_item[item].items():
            obs_item.append(i)
            obs_ann.append(a_index[a])
            obs_lab.append(c_index[vote.label])
    oi, oa, ol = np.array(obs_item), np.array(obs_ann), np.array(obs_lab)

    # sums over observations as bincounts (np.add.at is an order of magnitude slower)
    cell = oa * n_cls + ol  # (annotator, given) of each observation

    # initialise the class posteriors with the (soft) majority vote
    post = (
        np.bincount(oi * n_cls + ol, minlength=n_items * n_cls)
        .reshape(n_items, n_cls)
        .astype(float)
    )
    post /= post.sum(axis=1, keepdims=True)

    confusion = np.zeros((n_ann, n_cls, n_cls))
    prior = np.full(n_cls, 1.0 / n_cls)
    for _ in range(max_iter):
        # M-step: class priors and each annotator's confusion matrix π[a, true, given]
        prior = post.mean(axis=0)
        counts = np.full((n_ann, n_cls, n_cls), smoothing) + diagonal_prior * np.eye(
            n_cls
        )  # [annotator, given, true]
        weights = post[oi]
        for k in range(n_cls):
            counts[:, :, k] += np.bincount(
                cell, weights=weights[:, k], minlength=n_ann * n_cls
            ).reshape(n_ann, n_cls)
        confusion = counts.transpose(0, 2, 1)
        confusion = confusion / confusion.sum(axis=2, keepdims=True)
        # E-step: posterior of the true class of each item
        log_post = np.tile(np.log(np.clip(prior, 1e-300, None)), (n_items, 1))
        log_obs = np.log(confusion[oa, :, ol])  # (observation, true class)
        for k in range(n_cls):
            log_post[:, k] += np.bincount(oi, weights=log_obs[:, k], minlength=n_items)
        log_post -= log_post.max(axis=1, keepdims=True)
        new_post = np.exp(log_post)
        new_post /= new_post.sum(axis=1, keepdims=True)
        delta = float(np.abs(new_post - post).max())
        post = new_post
        if delta < tol:
            break

    tied = post >= post.max(axis=1, keepdims=True) - 1e-9  # classes within 1e-9 of the best
    best, n_tied = post.argmax(axis=1).tolist(), tied.sum(axis=1).tolist()
    result: dict[Item, str] = {}
    for i, item in enumerate(items):
        if n_tied[i] == 1:
            result[item] = classes[best[i]]
        else:
            names = {classes[k] for k in np.flatnonzero(tied[i])}
            result[item] = _majority(
                {a: v for a, v in per_item[item].items() if v.label in names} or per_item[item]
            )
    accuracy = {a: float((prior * np.diagonal(confusion[j])).sum()) for a, j in a_index.items()}
    return result, accuracy
