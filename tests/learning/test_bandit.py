"""The bandit strategy (active learning by learning): EXP3 core, convergence, state, registry."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoloop.acquisition.bandit import Bandit, exp3_probabilities, exp3_update
from histoloop.acquisition.strategies import (
    STRATEGIES,
    QueryContext,
    Selection,
    Strategy,
    get_strategy,
    list_strategies,
)
from histoloop.errors import InvalidArgument


def test_exp3_converges_to_the_dominant_arm_on_bernoulli_rewards() -> None:
    """Three arms paying 1 with probability 0.2, 0.5, 0.8: the last one ends up played."""
    rng = np.random.default_rng(0)
    means = np.array([0.2, 0.5, 0.8])
    lw = np.zeros(3)
    plays = np.zeros(3, int)
    for _ in range(400):
        p = exp3_probabilities(lw, 0.1)
        arm = int(rng.choice(3, p=p))
        plays[arm] += 1
        lw = exp3_update(lw, arm, float(rng.random() < means[arm]), p[arm], eta=0.1)
    assert exp3_probabilities(lw, 0.1).argmax() == 2
    assert exp3_probabilities(lw, 0.1)[2] > 0.8
    assert plays[2] > plays[0] + plays[1]


class _Poison(Strategy):
    """A deliberately bad arm: picks the spots whose labels contradict their cluster."""

    name = "poison_for_test"
    needs_model = True
    rows: np.ndarray = np.empty(0, np.int64)

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        free = self.rows[~ctx.labelled[self.rows]]
        pick = (
            free[:k]
            if len(free) >= k
            else np.concatenate(
                [free, rng.choice(np.setdiff1d(ctx.unlabelled, free), k - len(free), replace=False)]
            )
        )
        return Selection(indices=pick, scores=np.ones(len(pick)), strategy=self.name)


def _blobs(n_per: int = 300, seed: int = 0):
    r = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0, 0], [3, 0, 0, 0], [0, 3, 0, 0]], dtype=float)
    y = np.repeat(np.arange(3), n_per)
    X = centres[y] + r.standard_normal((len(y), 4))
    wrong = r.choice(len(y), 120, replace=False)  # 120 spots labelled as the next class
    y = y.copy()
    y[wrong] = (y[wrong] + 1) % 3
    return X.astype(np.float32), y, wrong


def test_bandit_learns_to_avoid_an_arm_that_hurts_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Margin against an arm that feeds contradicting labels: margin dominates, the bandit learns it."""
    from sklearn.linear_model import LogisticRegression

    X, y, wrong = _blobs()
    _Poison.rows = np.sort(wrong)
    monkeypatch.setitem(STRATEGIES, _Poison.name, _Poison)
    bandit = get_strategy("bandit", arms=f"margin,{_Poison.name}", random_share=0.25)
    labelled = np.zeros(len(y), bool)
    labelled[[np.flatnonzero(y == c)[0] for c in range(3)]] = True
    for round_ in range(1, 41):
        clf = LogisticRegression(max_iter=500).fit(X[labelled], y[labelled])
        P = clf.predict_proba(X).astype(np.float32)
        ctx = QueryContext(
            features=X,
            labelled=labelled,
            probabilities=P,
            round=round_,
            labels=np.where(labelled, y, -1),
        )
        state = json.loads(json.dumps(bandit.get_state()))  # what the loop stores between rounds
        bandit = get_strategy("bandit", arms=f"margin,{_Poison.name}", random_share=0.25)
        bandit.set_state(state)
        sel = bandit.select(ctx, 12, np.random.default_rng(round_))
        assert len(sel) == 12 and not labelled[sel.indices].any()
        labelled[sel.indices] = True
    probs = bandit.probabilities()
    plays = bandit.get_state()["plays"]
    assert probs[0] > 0.8, (probs, plays)
    assert plays[0] > plays[1]


def _ctx(n: int = 200, seed: int = 0, labelled: int = 20) -> QueryContext:
    r = np.random.default_rng(seed)
    P = r.dirichlet(np.ones(3), n).astype(np.float32)
    lab = np.zeros(n, bool)
    lab[:labelled] = True
    return QueryContext(
        features=r.standard_normal((n, 5)).astype(np.float32),
        labelled=lab,
        probabilities=P,
        labels=np.where(lab, r.integers(0, 3, n), -1),
    )


def test_state_round_trips_and_a_restored_bandit_chooses_as_the_original() -> None:
    ctx = _ctx()
    a = Bandit()
    a.select(ctx, 20, np.random.default_rng(1))
    b = Bandit()
    b.set_state(json.loads(json.dumps(a.get_state())))
    assert b.get_state() == a.get_state()
    s1 = a.select(ctx, 20, np.random.default_rng(2))
    s2 = b.select(ctx, 20, np.random.default_rng(2))
    assert np.array_equal(s1.indices, s2.indices) and a.get_state() == b.get_state()
    # a state for other arms (or none) starts afresh instead of failing
    c = Bandit(arms="entropy,random")
    c.set_state(a.get_state())
    assert c.get_state()["plays"] == [0, 0]


def test_query_set_keeps_a_random_share_and_never_repeats_spots() -> None:
    ctx = _ctx(labelled=50)
    bandit = Bandit(random_share=0.25)
    sel = bandit.select(ctx, 20, np.random.default_rng(0))
    assert len(sel) == 20 and len(np.unique(sel.indices)) == 20
    assert not ctx.labelled[sel.indices].any()
    assert (sel.scores == 0).sum() >= 5  # the random share (scored 0) is there
    assert sel.strategy == "bandit" and bandit.get_state()["last"]["arm"] in range(len(bandit.arms))


def test_registered_listed_and_checked() -> None:
    assert "bandit" in STRATEGIES
    info = next(i for i in list_strategies() if i.name == "bandit")
    assert info.needs_model and "arms" in info.parameters
    for bad in (
        {"arms": "entropy"},
        {"arms": "entropy,bandit"},
        {"arms": "entropy,nope"},
        {"random_share": 1.0},
        {"gamma": 0.0},
        {"eta": -1.0},
    ):
        with pytest.raises(InvalidArgument):
            get_strategy("bandit", **bad)
    with pytest.raises(Exception, match="needs model predictions"):
        Bandit().select(
            QueryContext(features=np.zeros((5, 2)), labelled=np.zeros(5, bool)),
            2,
            np.random.default_rng(0),
        )
