"""Inter-rater agreement: Cohen's kappa per annotator pair, Fleiss' kappa per project.

Both work on each annotator's latest label per spot (see :func:`consensus.latest_votes`).
Where every rater used one and the same class (expected agreement 1) kappa is undefined;
we return 1.0 then (perfect, if uninformative, agreement) instead of NaN.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from itertools import combinations

from histoloop.annotation_store.consensus import Item, Vote
from histoloop.annotation_store.domain import PairKappa
from histoloop.kappa import cohen_kappa as kappa

__all__ = ["cohen_kappa", "fleiss_kappa", "pairwise_cohen"]


def cohen_kappa(a: Mapping[Item, str], b: Mapping[Item, str]) -> tuple[float, int]:
    """Cohen's kappa of two raters over the items both rated; returns ``(kappa, n_common)``.

    ``kappa = (p_o - p_e) / (1 - p_e)`` with ``p_o`` the observed agreement and ``p_e``
    the agreement expected from each rater's own class frequencies. ``(0.0, 0)`` when
    the raters share no item.
    """
    common = [item for item in a if item in b]
    n = len(common)
    if n == 0:
        return 0.0, 0
    return kappa([a[item] for item in common], [b[item] for item in common]), n


def fleiss_kappa(per_item: Mapping[Item, Mapping[str, Vote]]) -> tuple[float, int]:
    """Fleiss' kappa over items rated by at least two annotators; ``(kappa, n_items)``.

    With a varying number of raters per item the per-item agreement is
    ``P_i = Σ_j n_ij (n_ij - 1) / (n_i (n_i - 1))`` and the class shares ``p_j`` are
    pooled over all ratings; with the same number of raters everywhere this is exactly
    Fleiss (1971). ``(0.0, 0)`` when no item has two raters.
    """
    rated = [votes for votes in per_item.values() if len(votes) >= 2]
    if not rated:
        return 0.0, 0
    totals: Counter[str] = Counter()
    p_items = []
    for votes in rated:
        counts = Counter(v.label for v in votes.values())
        n_i = len(votes)
        totals.update(counts)
        p_items.append(sum(c * (c - 1) for c in counts.values()) / (n_i * (n_i - 1)))
    n_ratings = sum(totals.values())
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((c / n_ratings) ** 2 for c in totals.values())
    if p_e >= 1.0:
        return 1.0, len(rated)
    return (p_bar - p_e) / (1.0 - p_e), len(rated)


def pairwise_cohen(per_item: Mapping[Item, Mapping[str, Vote]]) -> list[PairKappa]:
    """Cohen's kappa for every pair of annotators with at least one common item."""
    by_annotator: dict[str, dict[Item, str]] = {}
    for item, votes in per_item.items():
        for annotator, vote in votes.items():
            by_annotator.setdefault(annotator, {})[item] = vote.label
    result = []
    for a, b in combinations(sorted(by_annotator), 2):
        kappa, n = cohen_kappa(by_annotator[a], by_annotator[b])
        if n:
            result.append(PairKappa(annotator_a=a, annotator_b=b, kappa=kappa, n_common=n))
    return result
