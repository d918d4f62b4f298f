"""Simulated active-learning campaigns: which strategy, how many labels, how much saved.

An oracle answers every query set from the ground-truth label column of an AnnData, so
strategies (and training heads) can be compared on the user's own pre-annotated data
before a pathologist spends a week on one of them.

A campaign runs every *arm* (strategy × head) for every seed:

* **Data.** Vectors from ``obsm`` (one key or several side by side), or the
  library-size-normalised ``log1p`` of the counts in ``X`` reduced by PCA (also possible
  on ``obsm`` vectors). ``X`` that already holds normalised values (not whole numbers)
  is used as it is, and the campaign says so (``x_values``); optionally ``[x, mean of the k nearest spots' x]`` (spatial
  neighbour means, as in the live loop). Spots without a label are dropped after the
  neighbour means are taken. The features are standardised with a scaling fitted on
  every spot, with or without a label (no labels used), as the live training step does.
* **Splits.** Per seed, a stratified held-out test split (default 30 %) that is never
  queried; the rest is the *training pool*. Every arm of a seed gets the same split and
  the same initial labelled set (one random spot per class by default, or a cold-start
  strategy's picks).
* **Rounds.** The labelled-set sizes come from ``query_size`` (by default
  ``query_fraction`` of the pool) and ``rounds`` or a label ``budget``, and/or a
  ``schedule`` of labelled fractions of the pool ("0.1:1.0:0.1").
  Each round the arm's strategy picks from the pool with the previous round's model,
  the oracle labels the picks, the head is retrained (warm start, as in the live loop)
  and scored on the test split: macro-F1, balanced accuracy, accuracy, Cohen's kappa,
  per-class F1, plus query and training seconds.
* **Reference.** Per head and seed, a model trained on every pool label ("full
  supervision") with the arms' head, features, scaling and hyper-parameters, but trained
  to convergence: from scratch, early stopping on a validation split with a generous
  epoch cap (:data:`REFERENCE_MAX_EPOCHS`), so the target "95 % of full supervision" is
  measured, not assumed, and is not an under-trained model.
* **Stopping.** Every round records the live loop's stopping signal (predictions of the
  pool stable between rounds); the table reports where it first recommends stopping and
  how far the model then is from full supervision.
* **Simulated raters.** With ``raters`` (two or more styles, built from the ground truth:
  ``exact``; ``border``, who at a spot bordering another class gives that class half of
  the time; ``merge:<class>:<into>``, who folds one class into another) every labelled spot
  also gets each simulated rater's label, and each round fits the live loop's
  per-annotator model on them (:func:`histoloop.training.raters.fit_round_raters`) for the
  ``rater_disagreement`` strategy. The head still learns the ground truth.

A round is the live loop's round (:func:`histoloop.training.round.fit_round`, then
:func:`histoloop.acquisition.round.select_query`): the same seed rules, validation split,
resampling and compactness. Strategies see the pool only, through the model's hidden
features (the live loop's choice); a cold-start initial set is picked on the raw features,
as the live cold start does. BALD needs per-member probabilities, so it
runs only with the ``ensemble`` head (it is left out of the default set otherwise, and
rejected when asked for without that head).

Runs go to parallel processes (one torch/BLAS thread each) and append every finished
round to a per-run JSONL file in the campaign folder; a restarted campaign re-derives each
run's state from those files and continues (see :mod:`._engine`). When every run is
finished the campaign writes ``rounds.jsonl``, ``learning_curves.png``,
``efficiency.png`` and ``comparison.{json,md,tex}`` (see :mod:`._report`), and, when
an artifact store is given, stores them under ``simulations/<campaign>/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from google.protobuf import json_format

from histoloop.acquisition.settings import stopping_options, strategy_options
from histoloop.acquisition.stopping import recommend_stop
from histoloop.acquisition.strategies import STRATEGIES, UnknownStrategy, get_strategy
from histoloop.artifacts.base import ArtifactStore
from histoloop.errors import FailedPrecondition, InvalidArgument
from histoloop.formats.vocab import RESAMPLING_MODES
from histoloop.simulation import _engine as engine
from histoloop.simulation import _report as report
from histoloop.training.round import head_settings
from histoloop.v1 import common_pb2

__all__ = [
    "DEFAULT_PCA",
    "DEFAULT_QUERY_FRACTION",
    "METRICS",
    "LOOP_SETTINGS",
    "RPC_MAX_ROUNDS",
    "CampaignResult",
    "SimulationConfig",
    "SimulationData",
    "campaign_id",
    "default_strategies",
    "label_schedule",
    "load_anndata",
    "parse_schedule",
    "prepare_data",
    "project_default_config",
    "query_size_for",
    "run_campaign",
]

log = logging.getLogger(__name__)

METRICS = engine.METRICS
"""Metrics recorded per round (and usable as the campaign's ``metric``)."""
DEFAULT_PCA = 30
"""PCA components when neither ``obsm`` nor ``pca`` is given."""
DEFAULT_QUERY_FRACTION = 0.02
"""Query size as a share of the training pool when ``query_size`` is 0 (at least 1 spot)."""
RPC_MAX_ROUNDS = 5000
"""Largest campaign (rounds of all runs together) a SimulationService job accepts."""
SIMULATION_HEADS = ("mlp", "logreg", "ensemble")
"""Heads a simulation can train (the multimodal head needs two inputs; not simulated). Each
also as ``<head>+ssl``: the same head trained with pseudo-labels from label spreading over the
spatial and feature graphs (:mod:`histoloop.training.semi`), to measure it against the head."""
LOOP_SETTINGS = (
    "hybrid_share",
    "kmeans_pick",
    "mc_dropout_samples",
    "stop_max_change",
    "stop_min_kappa",
    "stop_patience",
    "stop_max_uncertainty",
    "resampling_every",
    "preset",
)
"""``LoopConfig`` fields a campaign takes in ``loop``: the strategy, stopping, MC-dropout and
training settings of a project, used by the same functions as in the live loop. The others
are the campaign's own fields (``strategies``, ``heads``, ``query_size``, ``neighbours``,
``compactness``, ``resampling``, …) or have nothing to act on in a simulation."""
_HEAD_COST = {"ensemble": 0, "mlp": 1, "logreg": 2}  # start the slow runs first
_FORMAT = "histoloop.simulation.v1"

Metric = Literal["macro_f1", "balanced_accuracy", "accuracy", "kappa"]
XValues = Literal["auto", "counts", "normalised"]
_X_VALUES = ("auto", "counts", "normalised")


@dataclass(frozen=True)
class SimulationConfig:
    """What a campaign runs. Everything here is part of the campaign's identity.

    Attributes:
        label_column: ``obs`` column with the ground truth (missing values are dropped);
            required (no dataset's column name is assumed).
        obsm: ``obsm`` keys of the feature vectors (side by side); empty: counts in ``X``.
        pca: PCA components (on ``log1p`` counts, or on the ``obsm`` vectors); 0 = none,
            except that with neither ``obsm`` nor ``pca`` :data:`DEFAULT_PCA` is used.
        neighbours: k for spatial neighbour-mean features (0 = off); needs
            ``obs["array_row"/"array_col"]`` or ``obsm["spatial"]``.
        strategies: Strategy names; empty = every registered strategy that works with
            the heads (:func:`default_strategies`). A plain name runs with every head
            (``bald`` only with ``ensemble``); ``name@head`` runs with that head only.
        heads: Training heads (``mlp``, ``logreg``, ``ensemble``); one arm per
            strategy × head.
        seeds: Number of seeds (0, 1, …, seeds − 1).
        test_fraction: Stratified held-out test share.
        initial: ``"per_class"`` (one random pool spot per class) or a cold-start
            strategy name (``random``, ``coldstart_kmeans``, ``typiclust``).
        initial_size: Initial set size with a cold-start strategy (0 = the query size).
        query_size: Spots per round with ``rounds`` or ``budget``; 0 = ``query_fraction``
            of the training pool (at least 1).
        query_fraction: Query size as a share of the pool when ``query_size`` is 0.
        rounds: Rounds of ``query_size`` after the initial set.
        budget: Label budget: rounds of ``query_size`` until this many labels.
        schedule: Labelled fractions of the pool to reach after the rounds above (or
            alone): each further round queries up to the next fraction.
        metric: Metric for the curves, the target and the comparison.
        target: Target as a share of the full-supervision metric.
        warm_start: Initialise each round's model from the previous one (live loop).
        resampling: Adaptive resampling of each round's training set (``off``,
            ``offline``, ``online``), as the project's ``resampling``.
        compactness: Spatial compactness of query sets, as the project's ``compactness``
            (needs ``obs["array_row"/"array_col"]``).
        hyperparameters: Per head name, head hyper-parameters
            (``{"ensemble": {"members": 3}}``); they override those that ``loop``
            implies (its preset's, MC-dropout).
        loop: A project's ``LoopConfig`` settings as JSON (proto field names), only the
            fields in :data:`LOOP_SETTINGS` (``{"hybrid_share": 0.5, "stop_patience": 3}``):
            every arm uses them as the live loop does — the strategy's options and the
            stopping rule through the acquisition's own functions, the preset's and
            MC-dropout's head settings and ``resampling_every`` in training.
        x_values: Without ``obsm``: what ``X`` holds. ``"counts"`` (whole numbers;
            library-size normalised and ``log1p``-transformed here), ``"normalised"``
            (used as it is), or ``"auto"``: counts when every value is a whole number,
            otherwise normalised — never normalised twice; the choice is recorded in
            ``campaign.json`` and logged.
        raters: Simulated annotators' styles (see the module docstring), none or at
            least two; the ``rater_disagreement`` strategy queries where their
            per-annotator models disagree (without raters it falls back to entropy).
    """

    label_column: str = ""
    obsm: tuple[str, ...] = ()
    pca: int = 0
    neighbours: int = 0
    strategies: tuple[str, ...] = ()
    heads: tuple[str, ...] = ("mlp",)
    seeds: int = 5
    test_fraction: float = 0.3
    initial: str = "per_class"
    initial_size: int = 0
    query_size: int = 0
    query_fraction: float = DEFAULT_QUERY_FRACTION
    rounds: int = 0
    budget: int = 0
    schedule: tuple[float, ...] = ()
    metric: Metric = "macro_f1"
    target: float = 0.95
    warm_start: bool = True
    hyperparameters: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    resampling: str = "off"
    compactness: float = 0.0
    x_values: XValues = "auto"
    raters: tuple[str, ...] = ()
    loop: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("obsm", "strategies", "heads", "raters"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            object.__setattr__(self, name, tuple(str(v) for v in value))
        object.__setattr__(self, "schedule", tuple(float(f) for f in self.schedule))
        object.__setattr__(self, "loop", dict(self.loop))

    @property
    def settings(self) -> common_pb2.LoopConfig:
        """The live loop's settings object of every arm: ``loop``, ``compactness`` and ``resampling``.

        Raises:
            InvalidArgument: ``loop`` names a field outside :data:`LOOP_SETTINGS` or a bad value.
        """
        unknown = sorted(set(self.loop) - set(LOOP_SETTINGS))
        if unknown:
            raise InvalidArgument(
                f"loop: {', '.join(unknown)} cannot be set here; a campaign takes "
                f"{', '.join(LOOP_SETTINGS)} (the rest are its own fields)"
            )
        config = common_pb2.LoopConfig(compactness=self.compactness, resampling=self.resampling)
        try:
            json_format.ParseDict(dict(self.loop), config)
        except json_format.ParseError as exc:
            raise InvalidArgument(f"loop: {exc}") from None
        return config

    def head_hyperparameters(self, head: str) -> dict[str, Any]:
        """What ``head`` trains with: the settings' (as the live training step) under ``hyperparameters``."""
        return {
            **head_settings(self.settings, engine.split_head(head)[0]),
            **dict(self.hyperparameters.get(head, {})),
        }

    @property
    def feature_pca(self) -> int:
        """PCA components actually used."""
        return self.pca or (0 if self.obsm else DEFAULT_PCA)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (lists for tuples)."""
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def validate(self) -> None:
        """Check everything that does not need the data.

        Raises:
            InvalidArgument: The message starts with the offending field's name.
        """
        if not self.label_column:
            raise InvalidArgument(
                "label_column is required: name the obs column with the ground truth"
            )
        if self.resampling not in RESAMPLING_MODES:
            raise InvalidArgument(
                f"resampling: {self.resampling!r} is not one of {', '.join(RESAMPLING_MODES)}"
            )
        if not self.compactness >= 0.0:
            raise InvalidArgument(f"compactness must be ≥ 0, got {self.compactness}")
        if self.x_values not in _X_VALUES:
            raise InvalidArgument(
                f"x_values must be one of {', '.join(_X_VALUES)}, got {self.x_values!r}"
            )
        if self.pca < 0:
            raise InvalidArgument(f"pca must be ≥ 0, got {self.pca}")
        _check_raters(self.raters)
        if self.neighbours < 0:
            raise InvalidArgument(f"neighbours must be ≥ 0, got {self.neighbours}")
        if self.seeds < 1 or self.seeds > 1000:
            raise InvalidArgument(f"seeds must be between 1 and 1000, got {self.seeds}")
        if not 0.0 < self.test_fraction < 1.0:
            raise InvalidArgument(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.query_size < 0:
            raise InvalidArgument(
                f"query_size must be ≥ 1 (or 0 = query_fraction of the pool), got {self.query_size}"
            )
        if not 0.0 < self.query_fraction <= 1.0:
            raise InvalidArgument(f"query_fraction must be in (0, 1], got {self.query_fraction}")
        if self.rounds < 0 or self.budget < 0:
            raise InvalidArgument("rounds and budget must be ≥ 0")
        if self.rounds and self.budget:
            raise InvalidArgument("rounds and budget: give one of them, not both")
        _check_schedule(self.schedule)
        if self.metric not in METRICS:
            raise InvalidArgument(
                f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}"
            )
        if not 0.0 < self.target <= 1.0:
            raise InvalidArgument(
                f"target must be in (0, 1] (a share of full supervision), got {self.target}"
            )
        if not self.heads:
            raise InvalidArgument("heads: give at least one head")
        for head in self.heads:
            if engine.split_head(head)[0] not in SIMULATION_HEADS:
                raise InvalidArgument(
                    f"heads: {head!r} cannot be simulated; choose from {', '.join(SIMULATION_HEADS)} "
                    f"(each also with {engine.SEMI_SUFFIX})"
                )
        if len(set(self.heads)) != len(self.heads):
            raise InvalidArgument("heads: a head is listed twice")
        unknown_hp = sorted(set(self.hyperparameters) - set(self.heads))
        if unknown_hp:
            raise InvalidArgument(
                f"hyperparameters: given for heads not in the campaign: {unknown_hp}"
            )
        for entry in self.strategies:
            name, _, head = entry.partition("@")
            if name not in STRATEGIES:
                raise UnknownStrategy(
                    f"strategies: unknown strategy {name!r}; choose from {', '.join(sorted(STRATEGIES))}"
                )
            if head and head not in self.heads:
                raise InvalidArgument(
                    f"strategies: {entry!r} names head {head!r}, which is not in heads"
                )
            if name == "bald" and head and not self._has_members(head):
                raise InvalidArgument(
                    f"strategies: {entry!r}: bald needs the 'ensemble' head "
                    "or mc_samples > 0 in the head's hyperparameters (MC-dropout)"
                )
        if len(set(self.strategies)) != len(self.strategies):
            raise InvalidArgument("strategies: a strategy is listed twice")
        if "bald" in self.strategies and not any(self._has_members(h) for h in self.heads):
            raise InvalidArgument(
                "strategies: 'bald' needs the 'ensemble' head (per-member probabilities); "
                "add ensemble to heads or drop bald"
            )
        for head in self.heads:
            if not self._names(head):
                raise InvalidArgument(f"strategies: none left for head {head!r}")
        if self.initial != "per_class":
            cls = STRATEGIES.get(self.initial)
            if cls is None or cls.needs_model:
                cold = sorted(n for n, c in STRATEGIES.items() if not c.needs_model)
                raise InvalidArgument(
                    f"initial must be 'per_class' or a cold-start strategy ({', '.join(cold)}), "
                    f"got {self.initial!r}"
                )
        if self.initial_size < 0:
            raise InvalidArgument(f"initial_size must be ≥ 0, got {self.initial_size}")
        from histoloop.training.heads import make_head

        settings = self.settings
        try:  # the values, checked by the functions that use them
            for strategy in sorted({s for _, s in self.arms()}):
                get_strategy(strategy, **strategy_options(strategy, settings))
            recommend_stop([], **stopping_options(settings))
            for head in self.heads:
                head_settings(settings, engine.split_head(head)[0])
        except InvalidArgument as exc:
            raise InvalidArgument(f"loop: {exc}") from None
        for head in self.heads:
            try:
                make_head(
                    engine.split_head(head)[0], n_classes=2, **self.head_hyperparameters(head)
                )
            except InvalidArgument as exc:
                raise InvalidArgument(f"hyperparameters[{head!r}]: {exc}") from None

    def _has_members(self, head: str) -> bool:
        """Whether ``head`` gives per-member probabilities (ensemble, or MC-dropout passes)."""
        return head == "ensemble" or int(self.head_hyperparameters(head).get("mc_samples", 0)) > 0

    def _names(self, head: str) -> list[str]:
        if not self.strategies:
            return list(default_strategies(head))
        names = {
            s for s in self.strategies if "@" not in s and (s != "bald" or self._has_members(head))
        }
        names |= {s.partition("@")[0] for s in self.strategies if s.partition("@")[2] == head}
        return sorted(names)

    def arms(self) -> list[tuple[str, str]]:
        """``(head, strategy)`` pairs, heads in the given order, strategies sorted."""
        return [(head, s) for head in self.heads for s in self._names(head)]


def _check_raters(raters: Sequence[str]) -> None:
    if len(raters) == 1:
        raise InvalidArgument(
            "raters: give none or at least two simulated raters (their models are compared)"
        )
    if len(set(raters)) != len(raters):
        raise InvalidArgument("raters: a rater is listed twice")
    for rater in raters:
        kind, _, rest = rater.partition(":")
        if kind in ("exact", "border") and not rest:
            continue
        if kind == "merge" and len(rest.split(":")) == 2 and all(rest.split(":")):
            continue
        raise InvalidArgument(
            f"raters: {rater!r} is not 'exact', 'border' or 'merge:<class>:<into>'"
        )


def simulated_raters(
    raters: Sequence[str],
    y: np.ndarray,
    classes: Sequence[str],
    positions: np.ndarray | None,
    seed: int = 17,
) -> tuple[tuple[str, np.ndarray], ...]:
    """Each simulated rater's label (class index) of every spot, built from the ground truth ``y``.

    Raises:
        InvalidArgument: a ``merge`` of an unknown class, or ``border`` without positions.
    """
    from histoloop.spatial import neighbour_indices, visium_array_positions

    rng = np.random.default_rng(seed)
    out = []
    for rater in raters:
        given = np.asarray(y, dtype=np.int64).copy()
        kind, _, rest = rater.partition(":")
        if kind == "merge":
            unknown = [c for c in rest.split(":") if c not in classes]
            if unknown:
                raise InvalidArgument(
                    f"raters: {rater!r} names classes {unknown} the labels do not have"
                )
            source, into = rest.split(":")
            given[given == list(classes).index(source)] = list(classes).index(into)
        elif kind == "border":
            if positions is None:
                raise InvalidArgument(
                    f"raters: {rater!r} needs spot positions (obs array_row/array_col)"
                )
            neighbours = neighbour_indices(
                visium_array_positions(positions[:, 0], positions[:, 1]), 6
            )
            for i in range(len(given)):
                other = [j for j in neighbours[i] if y[j] != y[i]]
                if other and rng.random() < 0.5:
                    given[i] = y[rng.choice(other)]
        out.append((rater, given))
    return tuple(out)


def default_strategies(head: str) -> tuple[str, ...]:
    """Every registered strategy that works with ``head`` (BALD only with ``ensemble``).

    Args:
        head: Training head name.

    Returns:
        Sorted strategy names.
    """
    return tuple(sorted(n for n in STRATEGIES if n != "bald" or head == "ensemble"))


def project_default_config(
    label_column: str, *, preset: str = "", **overrides: Any
) -> SimulationConfig:
    """The campaign that answers "does the project default beat random on my data?".

    Two arms with the head a ``CreateProject`` without settings gets (or ``preset``'s):
    its default strategy and ``random``, its spatial neighbour features and its
    cold start (the initial set drawn by the default cold-start strategy, one query's
    worth). Everything else keeps the :class:`SimulationConfig` defaults unless overridden.

    Args:
        label_column: ``obs`` column with the ground truth.
        preset: ``""`` (the evidence defaults) or a preset name (:mod:`histoloop.presets`).
        **overrides: Other :class:`SimulationConfig` fields (seeds, rounds, obsm, …).

    Returns:
        The campaign.
    """
    from histoloop.presets import loop_defaults

    d = loop_defaults(preset)
    strategies = tuple(dict.fromkeys((d["strategy"], "random")))
    values: dict[str, Any] = {
        "label_column": label_column,
        "heads": (d["head"],),
        "strategies": strategies,
        "neighbours": d["spatial_neighbours"],
        "initial": d["cold_start_strategy"],
    }
    values.update(overrides)
    values["loop"] = {**({"preset": preset} if preset else {}), **dict(overrides.get("loop", {}))}
    return SimulationConfig(**values)


# --------------------------------------------------------------------------- schedule


def parse_schedule(text: str) -> tuple[float, ...]:
    """Labelled fractions from ``"0.1:1.0:0.1"``, ``"0.1,0.2,0.5"`` or a mix of both.

    ``start:stop:step`` includes ``stop`` (within rounding); fractions are of the pool.

    Args:
        text: The schedule.

    Returns:
        Increasing fractions in (0, 1].

    Raises:
        InvalidArgument: Unparsable, out of range or not increasing (names ``schedule``).
    """
    out: list[float] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            pieces = [float(p) for p in part.split(":")]
        except ValueError:
            raise InvalidArgument(
                f"schedule: cannot read {part!r}; use start:stop:step or f1,f2,…"
            ) from None
        if len(pieces) == 1:
            out.append(pieces[0])
        elif len(pieces) == 3:
            start, stop, step = pieces
            if step <= 0 or stop < start:
                raise InvalidArgument(f"schedule: {part!r} needs step > 0 and stop ≥ start")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            if n > 10_000:
                raise InvalidArgument(f"schedule: {part!r} makes {n} rounds (at most 10000)")
            out += [round(start + i * step, 10) for i in range(n)]
        else:
            raise InvalidArgument(f"schedule: cannot read {part!r}; use start:stop:step or f1,f2,…")
    result = tuple(out)
    if not result:
        raise InvalidArgument("schedule: no fractions given")
    _check_schedule(result)
    return result


def _check_schedule(schedule: Sequence[float]) -> None:
    for f in schedule:
        if not (0.0 < f <= 1.0) or math.isnan(f):
            raise InvalidArgument(f"schedule: fractions must be in (0, 1], got {f}")
    if any(b <= a for a, b in zip(schedule, schedule[1:], strict=False)):
        raise InvalidArgument(f"schedule: fractions must increase, got {list(schedule)}")


def query_size_for(config: SimulationConfig, pool_size: int) -> int:
    """Spots per round: ``query_size``, or ``query_fraction`` of the pool when it is 0.

    Args:
        config: The campaign.
        pool_size: Training-pool size.

    Returns:
        At least 1.
    """
    if config.query_size:
        return int(config.query_size)
    return max(1, int(round(config.query_fraction * pool_size)))


def label_schedule(config: SimulationConfig, pool_size: int, initial_size: int) -> tuple[int, ...]:
    """Labelled-set size after each round (round 0 = the initial set).

    Rounds of the query size (:func:`query_size_for`; ``rounds`` of them, or until
    ``budget``; the budget is capped at the pool), then one round per ``schedule``
    fraction beyond that point (``ceil(f·pool)``). With none of the three: 20 rounds.

    Args:
        config: The campaign.
        pool_size: Training-pool size.
        initial_size: Initial labelled-set size.

    Returns:
        Strictly increasing sizes, the first being ``initial_size``.

    Raises:
        InvalidArgument: Nothing to query beyond the initial set (names the field).
    """
    targets = [initial_size]
    rounds, budget = config.rounds, config.budget
    step = query_size_for(config, pool_size)
    if not (rounds or budget or config.schedule):
        rounds = 20
    if rounds:
        for _ in range(rounds):
            if targets[-1] >= pool_size:
                break
            targets.append(min(targets[-1] + step, pool_size))
    if budget:
        if budget <= initial_size:
            raise InvalidArgument(
                f"budget ({budget}) must exceed the initial set ({initial_size} labels)"
            )
        cap = min(budget, pool_size)
        while targets[-1] < cap:
            targets.append(min(targets[-1] + step, cap))
    for f in config.schedule:
        n = min(pool_size, math.ceil(f * pool_size - 1e-9))  # at least the fraction asked for
        if n > targets[-1]:
            targets.append(n)
    if len(targets) < 2:
        raise InvalidArgument(
            f"schedule: nothing to query beyond the initial {initial_size} labels of a pool of {pool_size}"
        )
    return tuple(targets)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class SimulationData:
    """A campaign's prepared data.

    Attributes:
        problem: Features, labels, classes, splits and scaling (see ``_engine``).
        barcodes: ``(n,)`` spot ids (``obs_names``) of the rows used.
        pool_size: Training-pool size (the same for every seed).
        test_size: Test-split size.
        initial_size: Initial labelled-set size.
        targets: Labelled-set size after each round.
        fingerprint: SHA-256 of the prepared features, labels and splits.
        dropped: Spots dropped for a missing label.
        x_values: What the features came from: ``"obsm"``, ``"counts"`` (normalised
            here) or ``"normalised"`` (``X`` used as it is).
        query_size: Spots per round (:func:`query_size_for`).
    """

    problem: engine.Problem
    barcodes: np.ndarray
    pool_size: int
    test_size: int
    initial_size: int
    targets: tuple[int, ...]
    fingerprint: str
    dropped: int
    x_values: str = "obsm"
    query_size: int = 0


def _x_values(X: Any, config: SimulationConfig) -> str:
    """What ``X`` holds: ``"counts"`` or ``"normalised"`` (see ``SimulationConfig.x_values``)."""
    data = X.data if hasattr(X, "tocsr") else np.asarray(X)
    whole = bool(np.all(np.asarray(data) >= 0) and np.all(np.mod(np.asarray(data), 1.0) == 0.0))
    if config.x_values == "counts" and not whole:
        raise InvalidArgument(
            "x_values: 'counts' but X holds values that are not whole numbers ≥ 0 "
            "(already normalised?); use x_values 'normalised' or 'auto'"
        )
    if config.x_values != "auto":
        return config.x_values
    kind = "counts" if whole else "normalised"
    if kind == "normalised":
        log.warning(
            "X holds values that are not whole numbers: treated as already normalised and used as "
            "it is (no second log1p); give x_values='counts' to force normalisation"
        )
    return kind


def _features(adata: Any, config: SimulationConfig) -> tuple[np.ndarray, str]:
    from sklearn.decomposition import PCA

    if config.obsm:
        missing = [k for k in config.obsm if k not in adata.obsm]
        if missing:
            raise InvalidArgument(
                f"obsm: key(s) {missing} not in the data; it has {sorted(adata.obsm.keys()) or 'none'}"
            )
        blocks = [
            np.asarray(adata.obsm[k], dtype=np.float32).reshape(adata.n_obs, -1)
            for k in config.obsm
        ]
        X = np.hstack(blocks)
        kind = "obsm"
    else:
        if adata.X is None or adata.n_vars == 0:
            raise InvalidArgument(
                "pca: the data has no matrix in X to reduce; give obsm keys instead"
            )
        from histoloop.training.scaling import log1p_normalise

        kind = _x_values(adata.X, config)
        if kind == "counts":
            X = log1p_normalise(adata.X)
        else:
            raw = adata.X.toarray() if hasattr(adata.X, "toarray") else adata.X
            X = np.asarray(raw, dtype=np.float32)
    if not np.isfinite(X).all():
        raise InvalidArgument("obsm: the feature vectors contain NaN or infinite values")
    n_pca = config.feature_pca
    if n_pca:
        if n_pca > min(X.shape):
            raise InvalidArgument(
                f"pca: {n_pca} components but the data is {X.shape[0]} × {X.shape[1]}"
            )
        X = PCA(n_components=n_pca, svd_solver="full").fit_transform(X)
    return np.ascontiguousarray(X, dtype=np.float32), kind


def _positions(adata: Any) -> np.ndarray:
    from histoloop.spatial import visium_array_positions

    if {"array_row", "array_col"} <= set(adata.obs.columns):
        return visium_array_positions(
            adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
        )
    if "spatial" in adata.obsm:
        return np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    raise InvalidArgument(
        "neighbours: the data has neither obs array_row/array_col nor obsm['spatial']"
    )


def load_anndata(data: Any) -> Any:
    """An AnnData as given, or read from an ``.h5ad`` path.

    Args:
        data: An AnnData or a path.

    Returns:
        The AnnData.

    Raises:
        InvalidArgument: No such file, not ``.h5ad`` or unreadable (names ``data``).
    """
    import anndata as ad

    if isinstance(data, ad.AnnData):
        return data
    path = Path(data)
    if not path.is_file():
        raise InvalidArgument(f"data: no file at {path}")
    if path.suffix != ".h5ad":
        raise InvalidArgument(f"data: expected an .h5ad file, got {path.name}")
    try:
        return ad.read_h5ad(path)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgument(f"data: cannot read {path}: {exc}") from None


def prepare_data(data: Any, config: SimulationConfig) -> SimulationData:
    """Features, labels, splits and the label schedule; checks everything against the data.

    Args:
        data: An AnnData or the path of an ``.h5ad``.
        config: The campaign (validated here too).

    Returns:
        The :class:`SimulationData`.

    Raises:
        InvalidArgument: A field does not fit the data (the message names it).
    """
    from sklearn.model_selection import train_test_split

    from histoloop.spatial import neighbour_indices, neighbour_mean_features
    from histoloop.training.scaling import FeatureScaling

    config.validate()
    adata = load_anndata(data)
    if config.label_column not in adata.obs.columns:
        raise InvalidArgument(
            f"label_column: {config.label_column!r} is not an obs column; the data has "
            f"{list(adata.obs.columns)}"
        )
    with engine.single_threaded():  # BLAS thread count changes the last bits of a PCA
        X, x_kind = _features(adata, config)
        if config.neighbours:
            if config.neighbours >= adata.n_obs:
                raise InvalidArgument(
                    f"neighbours: {config.neighbours} but only {adata.n_obs} spots"
                )
            X = neighbour_mean_features(X, neighbour_indices(_positions(adata), config.neighbours))
    raw = adata.obs[config.label_column]
    keep = raw.notna().to_numpy() & (raw.astype(str).str.strip() != "").to_numpy()
    labels = raw[keep].astype(str).to_numpy()
    classes = tuple(sorted(set(labels)))
    if len(classes) < 2:
        raise InvalidArgument(
            f"label_column: {config.label_column!r} has {len(classes)} class(es); need ≥ 2"
        )
    y = np.searchsorted(np.asarray(classes), labels).astype(np.int64)
    counts = np.bincount(y, minlength=len(classes))
    if counts.min() < 2:
        rare = [c for c, n in zip(classes, counts, strict=True) if n < 2]
        raise InvalidArgument(
            f"label_column: class(es) {rare} have < 2 spots; a stratified test split needs 2"
        )
    with engine.single_threaded():
        scaling = FeatureScaling.fit(X)  # on every spot, labelled or not, as the live loop
    positions = None
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        positions = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.float64)[keep]
    X = X[keep]
    n = len(y)
    splits: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for seed in range(config.seeds):
        try:
            pool, test = train_test_split(
                np.arange(n), test_size=config.test_fraction, stratify=y, random_state=seed
            )
        except ValueError as exc:
            raise InvalidArgument(f"test_fraction: {exc}") from None
        splits[seed] = (np.sort(pool).astype(np.int64), np.sort(test).astype(np.int64))
    pool_size, test_size = len(splits[0][0]), len(splits[0][1])
    if config.initial == "per_class":
        initial_size = len(classes)
    else:
        initial_size = min(config.initial_size or query_size_for(config, pool_size), pool_size)
    targets = label_schedule(config, pool_size, initial_size)
    digest = hashlib.sha256()
    for part in (X, y, *[a for s in sorted(splits) for a in splits[s]]):
        digest.update(np.ascontiguousarray(part).tobytes())
    raters = simulated_raters(config.raters, y, classes, positions)
    for _name, given in raters:
        digest.update(given.tobytes())
    digest.update(json.dumps(classes).encode())
    problem = engine.Problem(
        X=X,
        y=y,
        classes=classes,
        splits=splits,
        scaling=scaling,
        positions=positions,
        raters=raters,
    )
    return SimulationData(
        problem=problem,
        barcodes=np.asarray(adata.obs_names[keep]).astype(str),
        pool_size=pool_size,
        test_size=test_size,
        initial_size=initial_size,
        targets=targets,
        fingerprint=digest.hexdigest(),
        dropped=int((~keep).sum()),
        x_values=x_kind,
        query_size=query_size_for(config, pool_size),
    )


def campaign_id(config: SimulationConfig, fingerprint: str) -> str:
    """A campaign's id: the same config on the same data gives the same id.

    Args:
        config: The campaign.
        fingerprint: :attr:`SimulationData.fingerprint`.

    Returns:
        ``sim-<12 hex digits>``.
    """
    blob = json.dumps({"config": config.to_dict(), "data": fingerprint}, sort_keys=True)
    return "sim-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- campaign


@dataclass(frozen=True)
class CampaignResult:
    """What :func:`run_campaign` did.

    Attributes:
        campaign_id: The campaign's id.
        folder: The campaign folder.
        complete: True when every run finished (the outputs exist only then).
        rounds_run: Rounds finished by this call (0 when everything was done already).
        comparison: The comparison table (``comparison.json``), or None if incomplete.
        files: Output name → path.
        uris: Output name → artifact URI (with a store).
        seconds: Wall-clock time of this call.
    """

    campaign_id: str
    folder: Path
    complete: bool
    rounds_run: int
    comparison: dict[str, Any] | None
    files: dict[str, Path]
    uris: dict[str, str]
    seconds: float


def _specs(config: SimulationConfig, prepared: SimulationData) -> list[engine.RunSpec]:
    specs = []
    settings = engine.settings_json(config.settings)
    heads_first = sorted(config.heads, key=lambda h: _HEAD_COST.get(engine.split_head(h)[0], 9))
    arms = config.arms()
    for head in heads_first:
        params = tuple(sorted(config.head_hyperparameters(head).items()))
        names = [engine.FULL] + [s for h, s in arms if h == head]
        for strategy in names:
            for seed in range(config.seeds):
                specs.append(
                    engine.RunSpec(
                        head=head,
                        strategy=strategy,
                        seed=seed,
                        targets=prepared.targets,
                        initial=config.initial,
                        initial_size=prepared.initial_size,
                        warm_start=config.warm_start,
                        hyperparameters=params,
                        settings=settings,
                    )
                )
    return specs


def _claim_folder(folder: Path, meta: dict[str, Any], resume: bool) -> None:
    """Create the campaign folder, or check it holds this campaign when resuming."""
    path = folder / "campaign.json"
    if path.exists():
        # settings first: resume is suggested only where it would be accepted
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") != meta["fingerprint"]:
            raise InvalidArgument(
                f"out: {folder} holds a campaign on other data; choose another folder"
            )
        if stored.get("config") != meta["config"]:
            keys = set(meta["config"]) | set(stored.get("config", {}))
            diff = sorted(
                k for k in keys if stored.get("config", {}).get(k) != meta["config"].get(k)
            )
            raise InvalidArgument(
                f"out: {folder} holds a campaign with other settings ({', '.join(diff)}); "
                "choose another folder (resume continues only the same settings)"
            )
        if not resume:
            raise InvalidArgument(
                f"out: {folder} holds this campaign already (same settings and data); resume it "
                "(resume/--resume) or choose another folder"
            )
        return
    if folder.exists() and any(folder.iterdir()):
        raise InvalidArgument(
            f"out: {folder} exists and is not a campaign folder; choose an empty or new folder"
        )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runs").mkdir(exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(path)


def run_campaign(
    data: Any,
    config: SimulationConfig,
    out: str | Path | None = None,
    *,
    root: str | Path | None = None,
    workers: int = 2,
    resume: bool = False,
    store: ArtifactStore | None = None,
    name: str = "",
    max_new_rounds: int | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    max_total_rounds: int | None = None,
) -> CampaignResult:
    """Run (or continue) a campaign and write its outputs.

    Every argument is checked before anything is written. With ``workers > 1`` the runs
    go to *spawned* processes (never forked: this may run inside a gRPC server), so a
    script that calls this needs the ``if __name__ == "__main__":`` guard.

    Args:
        data: An AnnData or the path of an ``.h5ad``.
        config: The campaign.
        out: Campaign folder (created; must be new or empty unless ``resume``).
        root: Without ``out``: the campaign folder is ``root/<campaign id>``.
        workers: Parallel processes (1 = run in this process).
        resume: Continue the campaign in ``out`` (finished rounds are skipped).
        store: If given, the outputs are also stored under ``simulations/<campaign>/``.
        name: Campaign id (default: derived from the config and the data).
        max_new_rounds: Stop every run after this many new rounds (a simulated kill, for
            tests); the outputs are then not written.
        progress: Show a tqdm bar over all rounds on stderr.
        on_progress: Called with ``(rounds done, rounds total)`` as rounds finish.
        max_total_rounds: Refuse campaigns of more rounds than this (all runs together).

    Returns:
        The :class:`CampaignResult`.

    Raises:
        InvalidArgument: A bad argument (the message names it).
    """
    t0 = time.perf_counter()
    if isinstance(workers, bool) or int(workers) < 1 or int(workers) > 256:
        raise InvalidArgument(f"workers must be between 1 and 256, got {workers}")
    if max_new_rounds is not None and max_new_rounds < 1:
        raise InvalidArgument(f"max_new_rounds must be ≥ 1, got {max_new_rounds}")
    if name:
        from histoloop.artifacts.base import validate_key

        if "/" in name:
            raise InvalidArgument(f"name: {name!r} must not contain '/'")
        try:
            validate_key(name)
        except InvalidArgument:
            raise InvalidArgument(f"name: {name!r} must use only [A-Za-z0-9_.=+@-]") from None
    if (out is None) == (root is None):
        raise InvalidArgument("out: give the campaign folder (or a root folder for it)")
    prepared = prepare_data(data, config)
    cid = name or campaign_id(config, prepared.fingerprint)
    folder = Path(out) if out is not None else Path(root) / cid  # type: ignore[arg-type]
    specs = _specs(config, prepared)
    total = sum(s.rounds for s in specs)
    if max_total_rounds is not None and total > max_total_rounds:
        raise InvalidArgument(
            f"seeds/strategies/heads/rounds: the campaign has {total} rounds in all (at most {max_total_rounds} "
            "here); make it smaller or run it with `histoloop simulate`"
        )
    meta = {
        "format": _FORMAT,
        "campaign_id": cid,
        "config": config.to_dict(),
        "fingerprint": prepared.fingerprint,
        "classes": list(prepared.problem.classes),
        "n_spots": int(len(prepared.problem.y)),
        "n_features": int(prepared.problem.X.shape[1]),
        "dropped_unlabelled": prepared.dropped,
        "pool_size": prepared.pool_size,
        "test_size": prepared.test_size,
        "initial_size": prepared.initial_size,
        "targets": list(prepared.targets),
        "x_values": prepared.x_values,
        "query_size": prepared.query_size,
        "arms": [list(a) for a in config.arms()],
    }
    with _folder_lock(folder):
        _claim_folder(folder, meta, resume)
        rounds_run = _execute(
            prepared.problem,
            specs,
            folder,
            workers=int(workers),
            max_new_rounds=max_new_rounds,
            progress=progress,
            on_progress=on_progress,
        )
        done = all(len(engine.read_records(engine.run_path(folder, s))) == s.rounds for s in specs)
        comparison: dict[str, Any] | None = None
        files: dict[str, Path] = {}
        uris: dict[str, str] = {}
        if done:
            records = [r for s in specs for r in engine.read_records(engine.run_path(folder, s))]
            comparison, files = report.write_outputs(folder, records, meta, config)
            files = {"campaign.json": folder / "campaign.json", **files}
            if store is not None:
                uris = _store_outputs(store, cid, files)
        else:
            log.info("campaign %s stopped before the end; resume it to finish", cid)
    seconds = time.perf_counter() - t0
    log.info(
        "campaign %s: %d rounds run in %.1f s (%s)",
        cid,
        rounds_run,
        seconds,
        "complete" if done else "incomplete",
    )
    return CampaignResult(
        campaign_id=cid,
        folder=folder,
        complete=done,
        rounds_run=rounds_run,
        comparison=comparison,
        files=files,
        uris=uris,
        seconds=seconds,
    )


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """One campaign per folder at a time in this process (concurrent identical RPCs)."""
    key = str(folder.resolve())
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(key, threading.Lock())
    if not lock.acquire(timeout=0):
        raise FailedPrecondition(f"out: campaign folder {folder} is in use by a running campaign")
    try:
        yield
    finally:
        lock.release()


_CONTENT_TYPES = {
    ".png": "image/png",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".md": "text/markdown",
    ".tex": "application/x-tex",
}


def _store_outputs(store: ArtifactStore, cid: str, files: Mapping[str, Path]) -> dict[str, str]:
    uris = {}
    for name, path in files.items():
        key = f"simulations/{cid}/{name}"
        if not store.exists(
            key
        ):  # artifacts are immutable; a resumed campaign keeps the first copy
            store.put(
                key,
                path.read_bytes(),
                content_type=_CONTENT_TYPES.get(path.suffix, "application/octet-stream"),
            )
        uris[name] = store.uri(key)
    return uris


def _execute(
    problem: engine.Problem,
    specs: list[engine.RunSpec],
    folder: Path,
    *,
    workers: int,
    max_new_rounds: int | None,
    progress: bool,
    on_progress: Callable[[int, int], None] | None,
) -> int:
    """Run every unfinished spec; returns the rounds finished now."""
    from tqdm import tqdm

    paths = [engine.run_path(folder, s) for s in specs]
    total = sum(s.rounds for s in specs)

    def count() -> int:
        return sum(min(engine.count_lines(p), s.rounds) for p, s in zip(paths, specs, strict=True))

    before = count()
    pending = [
        s for s, p in zip(specs, paths, strict=True) if len(engine.read_records(p)) < s.rounds
    ]
    bar = tqdm(
        total=total,
        initial=before,
        desc="simulated rounds",
        unit="round",
        disable=not progress,
        dynamic_ncols=True,
    )
    done = [before]  # a disabled bar does not count, so count here

    def one_more() -> None:
        done[0] += 1
        _tick(bar, done[0], total, on_progress)

    try:
        _tick(bar, before, total, on_progress)
        if workers == 1 or len(pending) <= 1:
            with engine.single_threaded():
                for spec in pending:
                    engine.run(
                        problem, spec, folder, max_new_rounds=max_new_rounds, on_round=one_more
                    )
        else:
            context = multiprocessing.get_context(
                "spawn"
            )  # never fork a process that may run gRPC threads
            with futures.ProcessPoolExecutor(
                max_workers=min(workers, len(pending)),
                mp_context=context,
                initializer=engine.init_worker,
                initargs=(problem,),
            ) as pool:
                running = {
                    pool.submit(engine.run_in_worker, s, str(folder), max_new_rounds)
                    for s in pending
                }
                try:
                    while running:
                        finished, running = futures.wait(
                            running, timeout=0.5, return_when=futures.FIRST_COMPLETED
                        )
                        for f in finished:
                            f.result()  # re-raise a worker's error here
                        _tick(bar, count(), total, on_progress)
                except BaseException:
                    for f in running:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return count() - before


def _tick(bar: Any, done: int, total: int, on_progress: Callable[[int, int], None] | None) -> None:
    bar.update(done - bar.n)
    if on_progress is not None:
        on_progress(done, total)
