"""Each rater against the consensus: per-annotator confusion matrices for GetAgreement.

Kappa says how much two raters agree; a confusion matrix says *how* a rater differs —
one who folds Layer2 into Layer3, one who is unsure only at borders. For every annotator
this counts, over the spots that at least two annotators rated, the annotator's latest
label (row) against the project's consensus label (column).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from histoloop.annotation_store.consensus import ConsensusLabel, Item, Vote

__all__ = ["RaterConfusion", "rater_confusions"]


@dataclass(frozen=True)
class RaterConfusion:
    """One annotator's labels against the consensus.

    Attributes:
        annotator: The annotator.
        counts: ``(C, C)`` counts, row = the annotator's class, column = the consensus
            class, in the order of the ``classes`` given to :func:`rater_confusions`.
        n_spots: Spots counted (rated by this annotator and at least one other).
        agreement: Share of those spots where the annotator gave the consensus label.
    """

    annotator: str
    counts: np.ndarray
    n_spots: int
    agreement: float


def rater_confusions(
    per_item: Mapping[Item, Mapping[str, Vote]],
    consensus: Mapping[Item, ConsensusLabel],
    classes: Sequence[str],
) -> list[RaterConfusion]:
    """Per-annotator confusion against the consensus, annotators sorted by id.

    Args:
        per_item: Each annotator's latest vote per spot (``latest_votes``).
        consensus: The consensus label per spot.
        classes: Class names; rows and columns follow this order (labels outside it are
            skipped).

    Returns:
        One :class:`RaterConfusion` per annotator who rated a multi-rated spot.
    """
    index = {name: i for i, name in enumerate(classes)}
    counts: dict[str, np.ndarray] = {}
    for item, votes in per_item.items():
        agreed = consensus.get(item)
        if len(votes) < 2 or agreed is None or agreed.label not in index:
            continue
        for annotator, vote in votes.items():
            if vote.label in index:
                matrix = counts.setdefault(
                    annotator, np.zeros((len(classes), len(classes)), dtype=np.int64)
                )
                matrix[index[vote.label], index[agreed.label]] += 1
    out = []
    for annotator in sorted(counts):
        matrix = counts[annotator]
        n = int(matrix.sum())
        out.append(
            RaterConfusion(
                annotator=annotator,
                counts=matrix,
                n_spots=n,
                agreement=float(np.trace(matrix) / n) if n else 0.0,
            )
        )
    return out
