"""Consensus rules and agreement statistics on hand-computed examples (no database)."""

from __future__ import annotations

import random

import pytest
from sklearn.metrics import cohen_kappa_score

from histoloop.annotation_store.agreement import cohen_kappa, fleiss_kappa, pairwise_cohen
from histoloop.annotation_store.consensus import Vote, compute_consensus, dawid_skene, latest_votes
from histoloop.errors import InvalidArgument


def votes(*rows: tuple[str, str, str, int, bool]) -> list[Vote]:
    return [
        Vote(item=item, annotator=a, label=lab, seq=seq, expert=expert)
        for item, a, lab, seq, expert in rows
    ]


# rules ----------------------------------------------------------------------------------------
def test_latest_expert_prefers_an_expert_over_a_later_annotator() -> None:
    result = compute_consensus(
        votes(("s1", "ann", "X", 3, False), ("s1", "exp", "Y", 1, True)), "latest_expert"
    )
    label = result.labels["s1"]
    assert label.label == "Y"
    assert label.disagreement == pytest.approx(0.5)
    assert label.disputed and label.n_annotators == 2


def test_latest_expert_without_experts_is_the_latest_label() -> None:
    result = compute_consensus(
        votes(("s1", "a", "X", 1, False), ("s1", "b", "Y", 2, False)), "latest_expert"
    )
    assert result.labels["s1"].label == "Y"


def test_a_correction_replaces_the_annotators_own_label() -> None:
    result = compute_consensus(
        votes(("s1", "a", "X", 1, False), ("s1", "a", "Y", 2, False)), "majority"
    )
    label = result.labels["s1"]
    assert (label.label, label.n_annotators, label.disputed, label.disagreement) == (
        "Y",
        1,
        False,
        0.0,
    )


def test_majority_vote_and_its_disagreement() -> None:
    result = compute_consensus(
        votes(
            ("s1", "a", "X", 1, False),
            ("s1", "b", "X", 2, False),
            ("s1", "c", "Y", 3, False),
            ("s2", "a", "Z", 4, False),
        ),
        "majority",
    )
    assert result.labels["s1"].label == "X"
    assert result.labels["s1"].disagreement == pytest.approx(1 / 3)
    assert result.labels["s2"].label == "Z" and not result.labels["s2"].disputed


def test_majority_ties_go_to_the_expert_then_to_the_latest() -> None:
    tie_expert = votes(("s", "e", "Y", 1, True), ("s", "a", "X", 2, False))
    assert compute_consensus(tie_expert, "majority").labels["s"].label == "Y"
    tie_plain = votes(("s", "a", "X", 1, False), ("s", "b", "Y", 2, False))
    assert compute_consensus(tie_plain, "majority").labels["s"].label == "Y"


def test_unknown_rule_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="consensus rule"):
        compute_consensus([], "vibes")


def _simulated(seed: int = 0) -> tuple[list[Vote], dict[int, str]]:
    rng = random.Random(seed)
    out, truth, seq = [], {}, 0
    for item in range(300):
        true = rng.choice("ABC")
        truth[item] = true
        for annotator, accuracy in (
            ("good1", 0.95),
            ("good2", 0.9),
            ("noisy1", 0.4),
            ("noisy2", 0.4),
        ):
            seq += 1
            given = true if rng.random() < accuracy else rng.choice("ABC")
            out.append(Vote(item=item, annotator=annotator, label=given, seq=seq))
    return out, truth


def test_dawid_skene_weights_reliable_annotators_and_beats_majority() -> None:
    sim, truth = _simulated()
    ds = compute_consensus(sim, "dawid_skene")
    majority = compute_consensus(sim, "majority")
    correct_ds = sum(ds.labels[i].label == t for i, t in truth.items())
    correct_mv = sum(majority.labels[i].label == t for i, t in truth.items())
    assert correct_ds > correct_mv
    assert correct_ds >= 0.95 * len(truth)
    rel = ds.reliability
    assert min(rel["good1"], rel["good2"]) > max(rel["noisy1"], rel["noisy2"]) + 0.2
    # deterministic
    assert compute_consensus(sim, "dawid_skene").labels == ds.labels


def test_dawid_skene_hand_example() -> None:
    # two careful annotators agree on every spot; a third always says "B": the third is unreliable
    rows = []
    seq = 0
    for i, true in enumerate("AABABBAA"):
        for annotator in ("x", "y"):
            seq += 1
            rows.append((f"s{i}", annotator, true, seq, False))
        seq += 1
        rows.append((f"s{i}", "z", "B", seq, False))
    result = compute_consensus(votes(*rows), "dawid_skene")
    assert [result.labels[f"s{i}"].label for i in range(8)] == list("AABABBAA")
    assert result.reliability["x"] > 0.9 and result.reliability["z"] < 0.7
    assert dawid_skene({}) == ({}, {})


# kappa ----------------------------------------------------------------------------------------
def test_cohen_kappa_hand_computed_and_sklearn() -> None:
    a = list("AABBABAA")
    b = list("ABBBAAAA")
    # p_o = 6/8, p_e = (5/8)^2 + (3/8)^2 = 34/64  ->  kappa = (48/64 - 34/64) / (30/64) = 7/15
    kappa, n = cohen_kappa(dict(enumerate(a)), dict(enumerate(b)))
    assert n == 8
    assert kappa == pytest.approx(7 / 15)
    assert kappa == pytest.approx(cohen_kappa_score(a, b))


@pytest.mark.parametrize("seed", range(5))
def test_cohen_kappa_matches_sklearn_on_random_raters(seed: int) -> None:
    rng = random.Random(seed)
    a = [rng.choice("ABCD") for _ in range(60)]
    b = [x if rng.random() < 0.6 else rng.choice("ABCD") for x in a]
    kappa, _ = cohen_kappa(dict(enumerate(a)), dict(enumerate(b)))
    assert kappa == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)


def test_cohen_kappa_uses_common_items_only_and_degenerate_cases() -> None:
    kappa, n = cohen_kappa({1: "A", 2: "B", 3: "A"}, {2: "B", 3: "A", 4: "C"})
    assert (kappa, n) == (pytest.approx(1.0), 2)
    assert cohen_kappa({1: "A"}, {2: "A"}) == (0.0, 0)
    assert cohen_kappa({1: "A", 2: "A"}, {1: "A", 2: "A"}) == (1.0, 2)  # undefined -> 1.0


def test_fleiss_kappa_wikipedia_example() -> None:
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    table = [
        [0, 0, 0, 0, 14],
        [0, 2, 6, 4, 2],
        [0, 0, 3, 5, 6],
        [0, 3, 9, 2, 0],
        [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0],
        [3, 2, 6, 3, 0],
        [2, 5, 3, 2, 2],
        [6, 5, 2, 1, 0],
        [0, 2, 2, 3, 7],
    ]
    rows, seq = [], 0
    for subject, counts in enumerate(table):
        rater = 0
        for category, count in enumerate(counts):
            for _ in range(count):
                seq += 1
                rows.append((subject, f"r{rater}", f"c{category}", seq, False))
                rater += 1
    kappa, n = fleiss_kappa(latest_votes(votes(*rows)))
    assert n == 10
    assert kappa == pytest.approx(0.20993, abs=1e-4)


def test_fleiss_kappa_needs_two_raters_and_pairwise_cohen() -> None:
    single = latest_votes(votes(("s1", "a", "X", 1, False)))
    assert fleiss_kappa(single) == (0.0, 0)
    per_item = latest_votes(
        votes(
            ("s1", "a", "X", 1, False),
            ("s1", "b", "X", 2, False),
            ("s2", "a", "Y", 3, False),
            ("s2", "b", "X", 4, False),
            ("s3", "c", "Y", 5, False),
        )
    )
    pairs = pairwise_cohen(per_item)
    assert [(p.annotator_a, p.annotator_b, p.n_common) for p in pairs] == [("a", "b", 2)]
    assert pairs[0].kappa == pytest.approx(cohen_kappa_score(["X", "Y"], ["X", "X"]))
