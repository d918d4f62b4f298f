"""A strategy that learns which strategy suits the tissue: active learning by learning.

After Hsu & Lin, "Active Learning by Learning" (AAAI 2015): a multi-armed bandit (EXP3,
the one-expert-per-arm case of their EXP4.P) chooses, each round, which strategy fills the
query set, and is rewarded by an estimate of how much the model improved — computed from
the labels the pathologist gives anyway, without a test set.

The reward. Each query set keeps a small **random share** (``random_share`` of the query,
at least ``min_random`` spots) drawn uniformly from the unlabelled spots. Those spots are
an unbiased sample of the pool that no model has been trained on when they are drawn.
The spots of round ``t + 1``'s random share are drawn one round early, at round ``t``,
when the model before round ``t``'s labels (``M_{t-1}``) gives their class probabilities;
at round ``t + 1`` the model after them (``M_t``) gives its own; once they are labelled
(round ``t + 2``) the reward of the arm played at round ``t`` is the mean gain in the
probability of the true class, ``mean(p_{M_t}(y) − p_{M_{t-1}}(y))`` over those spots (a
paired, lower-variance form of the importance-weighted accuracy gain: with uniform
sampling every weight is the same). Rewards arrive two rounds late; the bandit plays on
meanwhile. Every round gains less than the one before (the learning curve flattens), so
a gain is judged against the gains of the rounds just before it, whichever arm made them:
the reward is ``(gain − b)/s``, clipped to [−2, 2], with ``b`` and ``s`` moving averages of
the gains and of their deviations (a baseline, as in policy-gradient methods); the first
``burn_in`` gains only start the averages. Without this, whichever arm happens to be
played first collects the steep start of the curve.

The bandit. Weights ``w_a`` per arm, probabilities ``p_a = (1 − γ)·w_a/Σw + γ/K`` (γ keeps
exploring), one arm drawn per round, and the importance-weighted update
``log w_a += η·r/(K·p_a)`` for the arm that was played. The random share alone guarantees that
part of every query set is what random sampling would have asked for.

State. Everything learnt is a small JSON object (:meth:`Bandit.get_state`): the live loop
stores it in each query-set record, keyed by project and derived from the event that made
the query set; the simulation stores it with each round. Rows are spot indices of the
context; when the number of spots changes (a dataset joined) pending rewards are dropped,
the weights kept.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from histoloop.errors import InvalidArgument

from .strategies import (
    STRATEGIES,
    QueryContext,
    Selection,
    Strategy,
    _check_k,
    _need_probabilities,
    get_strategy,
)

__all__ = ["DEFAULT_ARMS", "Bandit", "exp3_probabilities", "exp3_update"]

DEFAULT_ARMS = "entropy,margin,least_confidence,activevisium,coreset,random"
"""The arms: uncertainty variants, ActiveVisium's two-stage query, diversity, random."""
_STATE_FORMAT = 1


def exp3_probabilities(log_weights: np.ndarray, gamma: float) -> np.ndarray:
    """EXP3 play probabilities ``(1 − γ)·softmax(log w) + γ/K``.

    Args:
        log_weights: ``(K,)`` log weights.
        gamma: Exploration share in [0, 1].

    Returns:
        ``(K,)`` probabilities summing to 1.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    w = np.exp(lw - lw.max())
    return (1.0 - gamma) * w / w.sum() + gamma / len(w)


def exp3_update(
    log_weights: np.ndarray, arm: int, reward: float, probability: float, eta: float
) -> np.ndarray:
    """The importance-weighted EXP3 update of the arm that was played.

    Args:
        log_weights: ``(K,)`` log weights.
        arm: The arm played.
        reward: Its reward (any sign).
        probability: The probability with which it was played.
        eta: Learning rate.

    Returns:
        The new log weights (a copy) ``log w_a += η·r/(K·p_a)``, shifted so the largest is 0.
    """
    lw = np.array(log_weights, dtype=np.float64)
    lw[arm] += eta * float(reward) / (len(lw) * max(float(probability), 1e-9))
    return lw - lw.max()


class Bandit(Strategy):
    """Active learning by learning: EXP3 over strategies, rewarded without a test set."""

    name = "bandit"
    description = (
        "learns per project which strategy to use (EXP3 over uncertainty, activevisium, "
        "diversity and random; reward: gain on a random share; Hsu & Lin 2015)"
    )
    needs_model = True

    def __init__(
        self,
        *,
        arms: str = DEFAULT_ARMS,
        random_share: float = 0.1,
        min_random: int = 2,
        gamma: float = 0.1,
        eta: float = 1.0,
        smoothing: float = 0.5,
        burn_in: int = 2,
    ) -> None:
        names = tuple(a.strip() for a in str(arms).split(",") if a.strip())
        if len(names) < 2 or len(set(names)) != len(names):
            raise InvalidArgument(f"arms: give at least two different strategies, got {arms!r}")
        for a in names:
            if a not in STRATEGIES or a in (self.name, "bald"):
                raise InvalidArgument(
                    f"arms: {a!r} cannot be an arm; choose registered strategies other than "
                    "bandit and bald"
                )
        if not 0.0 <= random_share < 1.0:
            raise InvalidArgument(f"random_share must be in [0, 1), got {random_share}")
        if min_random < 0:
            raise InvalidArgument(f"min_random must be ≥ 0, got {min_random}")
        if not 0.0 < gamma <= 1.0:
            raise InvalidArgument(f"gamma must be in (0, 1], got {gamma}")
        if eta <= 0:
            raise InvalidArgument(f"eta must be > 0, got {eta}")
        if burn_in < 1:
            raise InvalidArgument(f"burn_in must be ≥ 1, got {burn_in}")
        if not 0.0 < smoothing <= 1.0:
            raise InvalidArgument(f"smoothing must be in (0, 1], got {smoothing}")
        self.arms = names
        self.random_share, self.min_random, self.gamma, self.eta = (
            random_share,
            int(min_random),
            gamma,
            eta,
        )
        self.smoothing, self.burn_in = smoothing, int(burn_in)
        self._strategies = {a: get_strategy(a) for a in names}
        self._state = self._fresh()

    # state ---------------------------------------------------------------------------
    def _fresh(self) -> dict[str, Any]:
        return {
            "format": _STATE_FORMAT,
            "arms": list(self.arms),
            "log_weights": [0.0] * len(self.arms),
            "plays": [0] * len(self.arms),
            "rewards": [],
            "last": None,
            "next_eval": None,
            "pending": None,
            "n": None,
            "baseline": None,
            "spread": None,
        }

    def get_state(self) -> dict[str, Any]:
        """See :meth:`Strategy.get_state`."""
        return _json_copy(self._state)

    def set_state(self, state: dict[str, Any] | None) -> None:
        """See :meth:`Strategy.set_state`; a state for other arms starts afresh."""
        if (
            not state
            or state.get("format") != _STATE_FORMAT
            or list(state.get("arms", [])) != list(self.arms)
        ):
            self._state = self._fresh()
            return
        self._state = _json_copy(state)

    def probabilities(self) -> np.ndarray:
        """Current play probability per arm (in :attr:`arms` order)."""
        return exp3_probabilities(np.asarray(self._state["log_weights"]), self.gamma)

    def reward(self, arm: int, reward: float, probability: float) -> None:
        """Credit ``reward`` to ``arm``, played with ``probability`` (the EXP3 update)."""
        st = self._state
        st["log_weights"] = [
            float(x)
            for x in exp3_update(np.asarray(st["log_weights"]), arm, reward, probability, self.eta)
        ]

    def credit(self, arm: int, gain: float, probability: float) -> float:
        """Judge a measured ``gain`` against the recent gains, credit it; returns the reward."""
        st = self._state
        a = self.smoothing
        seen = [g for _, g, _ in st["rewards"]]
        reward = 0.0
        if len(seen) < self.burn_in:  # start the averages
            seen.append(gain)
            b = float(np.mean(seen))
            s = float(np.mean(np.abs(np.asarray(seen) - b)))
        else:
            b, s = st["baseline"], st["spread"]
            reward = float(np.clip((gain - b) / max(s, 1e-3), -2.0, 2.0))
            self.reward(arm, reward, probability)
            s = (1 - a) * s + a * abs(gain - b)
            b = (1 - a) * b + a * gain
        st["baseline"], st["spread"] = float(b), float(s)
        st["rewards"].append([self.arms[arm], round(float(gain), 6), round(reward, 4)])
        return reward

    # the query -----------------------------------------------------------------------
    def _settle(self, ctx: QueryContext) -> None:
        """Pay the reward whose spots are labelled now; start the one measured this round."""
        st = self._state
        if st["n"] is not None and st["n"] != ctx.n:  # spots changed: rows no longer mean the same
            st["pending"] = st["next_eval"] = st["last"] = None
        st["n"] = ctx.n
        P = ctx.probabilities
        pending = st["pending"]
        if pending is not None and ctx.labels is not None:
            rows = np.asarray(pending["rows"], dtype=np.int64)
            y = ctx.labels[rows]
            known = y >= 0
            if known.any():
                old = np.asarray(pending["old"], dtype=np.float64)[known]
                new = np.asarray(pending["new"], dtype=np.float64)[known]
                idx = np.arange(int(known.sum()))
                gain = float(np.mean(new[idx, y[known]] - old[idx, y[known]]))
                self.credit(int(pending["arm"]), gain, float(pending["probability"]))
            st["pending"] = None
        nxt, last = st["next_eval"], st["last"]
        if nxt is not None and last is not None and P is not None:
            rows = np.asarray(nxt["rows"], dtype=np.int64)
            keep = ~ctx.labelled[rows]
            if keep.any():
                st["pending"] = {
                    "arm": last["arm"],
                    "probability": last["probability"],
                    "rows": rows[keep].tolist(),
                    "old": np.asarray(nxt["old"])[keep].round(6).tolist(),
                    "new": P[rows[keep]].astype(np.float64).round(6).tolist(),
                }

    def select(self, ctx: QueryContext, k: int, rng: np.random.Generator) -> Selection:
        """See :meth:`Strategy.select`: the random share, then the chosen arm's picks."""
        k = _check_k(k)
        P = _need_probabilities(ctx, self.name)
        self._settle(ctx)
        st = self._state
        free = ctx.unlabelled
        # this round's random share: the spots drawn last round (their reward is measured), else fresh ones
        want = (
            max(self.min_random, int(math.ceil(self.random_share * k)))
            if self.random_share > 0
            else 0
        )
        share = min(len(free), k - 1, want)
        planned = np.asarray(st["pending"]["rows"] if st["pending"] else [], dtype=np.int64)[:share]
        extra = np.setdiff1d(free, planned)
        more = (
            rng.choice(extra, size=min(share - len(planned), len(extra)), replace=False)
            if share > len(planned)
            else np.empty(0, np.int64)
        )
        random_rows = np.concatenate([planned, more]).astype(np.int64)
        # the arm
        probs = self.probabilities()
        arm = int(rng.choice(len(self.arms), p=probs))
        st["plays"][arm] += 1
        st["last"] = {"arm": arm, "probability": float(probs[arm])}
        rest = k - len(random_rows)
        picked = np.empty(0, np.int64)
        scores = np.empty(0)
        if rest > 0 and len(free) > len(random_rows):
            labelled = ctx.labelled.copy()
            labelled[random_rows] = True
            inner = QueryContext(
                features=ctx.features,
                labelled=labelled,
                probabilities=ctx.probabilities,
                member_probabilities=ctx.member_probabilities,
                positions=ctx.positions,
                disagreement=ctx.disagreement,
                round=ctx.round,
                labels=ctx.labels,
            )
            sel = self._strategies[self.arms[arm]].select(inner, rest, rng)
            picked, scores = sel.indices, sel.scores
        rows = np.concatenate([picked, random_rows]).astype(np.int64)
        # next round's random share, drawn now so that this model's view of it is known
        left = np.setdiff1d(free, rows)
        nxt = (
            rng.choice(left, size=min(share, len(left)), replace=False)
            if share
            else np.empty(0, np.int64)
        )
        st["next_eval"] = (
            {"rows": nxt.tolist(), "old": P[nxt].astype(np.float64).round(6).tolist()}
            if len(nxt)
            else None
        )
        return Selection(
            indices=rows,
            scores=np.concatenate([scores, np.zeros(len(random_rows))]),
            strategy=self.name,
        )  # the arm played is in the state ("last")


def _json_copy(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy through JSON (what a stored state reads back as)."""
    import json

    return json.loads(json.dumps(state))


STRATEGIES[Bandit.name] = Bandit
