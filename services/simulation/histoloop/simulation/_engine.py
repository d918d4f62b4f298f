"""One simulated active-learning run (one strategy × head × seed), resumable round by round.

A run appends one JSON line per finished round to its own file
``runs/<head>.<strategy>.seed<k>.jsonl``. A line holds the spots picked that round (row
indices into the prepared data), so a restarted run re-derives its labelled set from the
file and carries on from the next round. The model of the last finished round is kept
beside it (``….r<round>.model``, written *before* the line), so the warm start of the
next round is the same as in an uninterrupted run; predictions are recomputed from it.

Everything random is derived from ``(seed, round)``, never from process state, so a run
gives the same numbers in any process, in any order, before or after a restart. A
stateful strategy (``bandit``) stores its state in each line and gets it back on restart.

A round is the live loop's round: the model comes from
:func:`histoloop.training.round.fit_round` and the picks from
:func:`histoloop.acquisition.round.select_query`, with the same seed rules and the same
settings object (the project's ``LoopConfig``, :attr:`RunSpec.settings`). While the labels
cover one class there is no model, and the picks come from
:data:`~histoloop.acquisition.round.MORE_CLASSES_STRATEGY`, as the live loop asks then. Each
line also holds the new model's predicted class of every pool spot (compact) and the live
loop's stopping signal computed from the last rounds' predictions.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from histoloop.acquisition.round import MORE_CLASSES_STRATEGY, select_query
from histoloop.acquisition.settings import stopping_options, stopping_rounds
from histoloop.acquisition.stopping import RoundPredictions, recommend_stop
from histoloop.acquisition.strategies import STRATEGIES, QueryContext, RaterDisagreement
from histoloop.formats.vocab import DEFAULT_RESAMPLING
from histoloop.training.evaluate import classification_metrics
from histoloop.training.export import scaled_inputs
from histoloop.training.pipeline import TrainedModel
from histoloop.training.predict import predict
from histoloop.training.raters import fit_round_raters
from histoloop.training.round import VALIDATION_FRACTION, fit_round
from histoloop.training.scaling import FeatureScaling
from histoloop.v1 import common_pb2

__all__: list[str] = []  # private module; the public API is histoloop.simulation

log = logging.getLogger(__name__)

FULL = "full"
"""Pseudo-strategy name of the full-supervision reference."""

METRICS = ("macro_f1", "balanced_accuracy", "accuracy", "kappa")
REFERENCE_MAX_EPOCHS = 400
"""Epoch cap of the full-supervision reference (early stopping ends it long before)."""
REFERENCE_MIN_PATIENCE = 20
"""Smallest early-stopping patience of the reference."""
REFERENCE_MAX_ITER = 2000
"""L-BFGS iterations of a logistic-regression reference."""
REFERENCE_LR_DROPS = 2
"""Times the reference goes back to its best weights and divides the learning rate by 10."""
_INITIAL_SALT = 0x5EED  # keeps the initial draw apart from the per-round streams


@dataclass(frozen=True)
class Problem:
    """The prepared data every run of a campaign shares (sent once to each worker).

    Attributes:
        X: ``(n, d)`` float32 features of the labelled spots.
        y: ``(n,)`` int64 class indices.
        classes: Class names by index.
        splits: Per seed: ``(pool_rows, test_rows)`` sorted int64.
        scaling: Standardisation fitted on every spot (no labels used).
        positions: ``(n, 2)`` array row/column of each spot (spatially compact query
            sets, the spatial graph of ``+ssl`` heads), or None.
        raters: Simulated raters: ``(name, class index of every spot)`` each, or empty.
    """

    X: np.ndarray
    y: np.ndarray
    classes: tuple[str, ...]
    splits: dict[int, tuple[np.ndarray, np.ndarray]]
    scaling: FeatureScaling
    positions: np.ndarray | None = None
    raters: tuple[tuple[str, np.ndarray], ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """What one run does.

    Attributes:
        head: Training head name.
        strategy: Strategy name, or :data:`FULL` for the full-supervision reference.
        seed: Campaign seed.
        targets: Labelled-set size after each round (round 0 = the initial set).
        initial: ``"per_class"`` or a cold-start strategy name.
        initial_size: Size of the initial set when drawn by a strategy.
        warm_start: Start each round's model from the previous round's weights.
        hyperparameters: Head hyper-parameters.
        validation_fraction: Labelled share held out for early stopping.
        settings: The project's ``LoopConfig`` as canonical JSON (:func:`settings_json`):
            what shapes a query (compactness, strategy options), the stopping rule and
            resampling, as the live loop reads them; empty: the defaults.
    """

    head: str
    strategy: str
    seed: int
    targets: tuple[int, ...]
    initial: str
    initial_size: int
    warm_start: bool
    hyperparameters: tuple[tuple[str, Any], ...]
    validation_fraction: float = VALIDATION_FRACTION
    settings: str = ""

    @property
    def loop(self) -> common_pb2.LoopConfig:
        """:attr:`settings` as the live loop's settings object."""
        return json_format.Parse(self.settings or "{}", common_pb2.LoopConfig())

    @property
    def name(self) -> str:
        """File stem of the run."""
        return f"{self.head}.{self.strategy}.seed{self.seed}"

    @property
    def rounds(self) -> int:
        """Records the finished run holds."""
        return 1 if self.strategy == FULL else len(self.targets)


def settings_json(config: common_pb2.LoopConfig) -> str:
    """``config`` as canonical JSON (proto field names, sorted keys) for :attr:`RunSpec.settings`."""
    return json.dumps(
        json_format.MessageToDict(config, preserving_proto_field_name=True), sort_keys=True
    )


# --------------------------------------------------------------------------- records


def run_path(folder: Path, spec: RunSpec) -> Path:
    """The run's JSONL file."""
    return folder / "runs" / f"{spec.name}.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The finished rounds in a run file, oldest first.

    A torn last line (the process died while writing it) is dropped, and the file is cut
    back to the last complete line so that the next append starts on a fresh line.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
        good += len(line)
    if good != len(data):
        log.warning("%s: dropping a torn record at byte %d (a killed run)", path.name, good)
        with open(path, "r+b") as fh:
            fh.truncate(good)
    # rounds are written in order; keep the contiguous prefix 0, 1, 2, …
    out = []
    for i, rec in enumerate(records):
        if rec.get("round") != i:
            break
        out.append(rec)
    return out


def count_lines(path: Path) -> int:
    """Complete lines in a run file (for the progress bar; cheap)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _append(path: Path, record: dict[str, Any]) -> None:
    line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _model_path(path: Path, round_: int) -> Path:
    return path.with_name(f"{path.stem}.r{round_}.model")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- workers

_PROBLEM: Problem | None = None


def init_worker(problem: Problem) -> None:
    """Process-pool initializer: one BLAS/torch thread, the shared problem in a global."""
    global _PROBLEM
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(limits=1)
    _PROBLEM = problem


def run_in_worker(spec: RunSpec, folder: str, max_new_rounds: int | None) -> int:
    """Process-pool entry point: :func:`run` on the worker's problem."""
    assert _PROBLEM is not None, "init_worker was not called"
    return run(_PROBLEM, spec, Path(folder), max_new_rounds=max_new_rounds)


_SINGLE_THREADED = threading.RLock()


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch and BLAS thread inside the block (restored after).

    The BLAS thread count is process-wide and the block restores it on leaving, so two
    threads' blocks must not overlap: one leaving would lift the limit under the other's
    computation (a PCA then differs in its last bits, and so does every number after it).
    Blocks in different threads therefore run one at a time; a block nests in its own
    thread.
    """
    import torch
    from threadpoolctl import threadpool_limits

    with _SINGLE_THREADED:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with threadpool_limits(limits=1):
                yield
        finally:
            torch.set_num_threads(previous)


# --------------------------------------------------------------------------- the run


class _Constant:
    """Stand-in model while the labels cover one class: predicts it, knows nothing."""

    def __init__(self, n_classes: int, label: int) -> None:
        self.n_classes, self.label = n_classes, label


def reference_hyperparameters(head: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The arms' hyper-parameters with training run to convergence (the reference's).

    Same head, learning rate, width, decay…; only the stopping rule changes: an epoch cap
    of :data:`REFERENCE_MAX_EPOCHS` with early stopping (patience ≥
    :data:`REFERENCE_MIN_PATIENCE`) on the validation split, annealed
    :data:`REFERENCE_LR_DROPS` times (best weights, learning rate / 10) before it stops;
    or ≥ :data:`REFERENCE_MAX_ITER` L-BFGS iterations for logistic regression.
    """
    from histoloop.training.heads import make_head

    resolved = make_head(head, n_classes=2, **hyperparameters).hyperparameters
    out = dict(hyperparameters)
    if "max_epochs" in resolved:
        out["max_epochs"] = max(int(resolved["max_epochs"]), REFERENCE_MAX_EPOCHS)
        out["patience"] = max(int(resolved["patience"]), REFERENCE_MIN_PATIENCE)
        out["lr_drops"] = max(int(resolved.get("lr_drops", 0)), REFERENCE_LR_DROPS)
    if "max_iter" in resolved:
        out["max_iter"] = max(int(resolved["max_iter"]), REFERENCE_MAX_ITER)
    return out


SEMI_SUFFIX = "+ssl"
"""A head name with this suffix trains with pseudo-labels from label spreading (``logreg+ssl``)."""


def split_head(name: str) -> tuple[str, bool]:
    """``(training head, semi-supervised?)`` of a simulated head name."""
    return (name[: -len(SEMI_SUFFIX)], True) if name.endswith(SEMI_SUFFIX) else (name, False)


class _Semi:
    """Pseudo-labels for one run: the pool's graph, built once, and the spreading settings."""

    def __init__(self, problem: Problem, pool: np.ndarray, scaled_pool: np.ndarray) -> None:
        from histoloop.training.semi import SemiSupervised, combined_graph

        self.settings = SemiSupervised()
        positions = None if problem.positions is None else problem.positions[pool]
        self.graph = combined_graph(
            scaled_pool,
            positions,
            feature_neighbours=self.settings.feature_neighbours,
            spatial_neighbours=self.settings.spatial_neighbours,
        )
        self.pool = pool

    def rows(self, problem: Problem, labelled_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(pool rows, class indices)`` of the confident pseudo-labels."""
        from histoloop.training.semi import label_spreading, pseudo_labels

        s = self.settings
        where = np.searchsorted(self.pool, labelled_rows)
        labelled = np.zeros(len(self.pool), bool)
        labelled[where] = True
        y = np.zeros(len(self.pool), np.int64)
        y[where] = problem.y[labelled_rows]
        spread = label_spreading(
            self.graph,
            labelled,
            y,
            len(problem.classes),
            alpha=s.alpha,
            iterations=s.iterations,
            balanced=s.balanced,
        )
        rows, cls = pseudo_labels(
            spread, labelled, s.threshold, max_count=int(s.max_share * len(labelled_rows))
        )
        return self.pool[rows], cls


def _train(
    problem: Problem,
    spec: RunSpec,
    rows: np.ndarray,
    previous: TrainedModel | None,
    round_: int,
    semi: _Semi | None = None,
) -> tuple[TrainedModel | _Constant, float]:
    t0 = time.perf_counter()
    y = problem.y[rows]
    if len(np.unique(y)) < 2:
        return _Constant(len(problem.classes), int(y[0])), time.perf_counter() - t0
    if semi is not None:  # pseudo-labelled pool spots join the labelled ones
        extra, extra_y = semi.rows(problem, rows)
        rows, y = np.concatenate([rows, extra]), np.concatenate([y, extra_y])
    names = np.asarray(problem.classes, dtype=object)[y]
    head, _ = split_head(spec.head)
    hyperparameters = dict(spec.hyperparameters)
    if spec.strategy == FULL:
        hyperparameters = reference_hyperparameters(head, hyperparameters)
    loop = spec.loop
    model = fit_round(
        {"features": problem.X},
        rows,
        names,
        head=head,
        seed=spec.seed,
        classes=problem.classes,
        resampling=loop.resampling or DEFAULT_RESAMPLING,
        scaling={"features": problem.scaling},
        previous=previous if spec.warm_start else None,
        hyperparameters=hyperparameters,
        validation_fraction=spec.validation_fraction,
        resampling_every=int(loop.resampling_every),
    )
    return model, time.perf_counter() - t0


def _predict(model: TrainedModel | _Constant, X: np.ndarray, scaled: np.ndarray):
    """``(probabilities, hidden, member_probabilities)`` for rows ``X``."""
    if isinstance(model, _Constant):
        P = np.zeros((len(X), model.n_classes), dtype=np.float32)
        P[:, model.label] = 1.0
        return P, scaled, None
    p = predict(model, X)
    return p.probabilities, p.hidden, p.member_probabilities


def _evaluate(
    problem: Problem, model: TrainedModel | _Constant, test: np.ndarray
) -> dict[str, Any]:
    P, _, _ = _predict(model, problem.X[test], problem.X[test])
    return classification_metrics(problem.y[test], P.argmax(axis=1), classes=problem.classes)


def _initial(problem: Problem, spec: RunSpec, pool: np.ndarray) -> np.ndarray:
    """The initial labelled set (rows into ``problem``): the same for every strategy."""
    rng = np.random.default_rng([spec.seed, _INITIAL_SALT])
    if spec.initial == "per_class":
        y = problem.y[pool]
        return np.array([rng.choice(pool[y == c]) for c in np.unique(y)], dtype=np.int64)
    # the live cold start: the raw features, no labels, round 0
    ctx = QueryContext(
        features=problem.X[pool],
        labelled=np.zeros(len(pool), bool),
        positions=_pool_positions(problem, pool),
        round=0,
    )
    selection = select_query(
        ctx, strategy=spec.initial, query_size=spec.initial_size, seed=spec.seed, settings=spec.loop
    )
    return pool[selection.indices]


def _rater_disagreement(
    problem: Problem,
    spec: RunSpec,
    model: TrainedModel | _Constant | None,
    labelled_rows: Sequence[int],
    X_pool: np.ndarray,
) -> np.ndarray | None:
    """The pool's disagreement of the simulated raters' per-annotator models (the live loop's,
    fitted on every rater's label of the labelled spots), where the strategy reads it."""
    if (
        spec.strategy != RaterDisagreement.name
        or not problem.raters
        or not isinstance(model, TrainedModel)
    ):
        return None
    votes = [
        (int(row), name, problem.classes[given[row]])
        for name, given in problem.raters
        for row in labelled_rows
    ]
    per_rater = fit_round_raters({"features": problem.X}, model, votes, seed=spec.seed)
    return per_rater.disagreement(scaled_inputs(model, X_pool))


def _pool_positions(problem: Problem, pool: np.ndarray) -> np.ndarray | None:
    return None if problem.positions is None else problem.positions[pool]


def _record(
    spec: RunSpec,
    round_: int,
    labels: int,
    pool_size: int,
    metrics: dict[str, Any],
    picked: Sequence[int] | np.ndarray,
    query_s: float,
    train_s: float,
    predict_s: float = 0.0,
    validation: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One round: test metrics, the model's own validation metrics (what the live loop
    reports), timings (selection, training, pool prediction), picks and ``extra`` (the
    stopping signal, classes labelled, a stateful strategy's state)."""
    return {
        "head": spec.head,
        "strategy": spec.strategy,
        "seed": spec.seed,
        "round": round_,
        "labels": int(labels),
        "fraction": labels / pool_size,
        **{m: metrics[m] for m in METRICS},
        "per_class_f1": metrics["per_class_f1"],
        "query_seconds": round(query_s, 6),
        "train_seconds": round(train_s, 6),
        "predict_seconds": round(predict_s, 6),
        "picked": [int(i) for i in picked],
        "validation": {m: (validation or {}).get(m) for m in METRICS},
        **(extra or {}),
    }


def _pack(predicted: np.ndarray) -> str:
    """Predicted classes of the pool, compact (base64 of uint16)."""
    return base64.b64encode(np.asarray(predicted, dtype="<u2").tobytes()).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<u2").astype(np.int64)


def _stopping(
    done: list[dict[str, Any]], P: np.ndarray, loop: common_pb2.LoopConfig
) -> dict[str, Any]:
    """The live loop's stopping signal over the last rounds' pool predictions."""
    history = [
        RoundPredictions(predicted=_unpack(r["pool_predicted"]))
        for r in done[-(stopping_rounds(loop) - 1) :]
        if r.get("pool_predicted")
    ]
    history.append(RoundPredictions(predicted=P.argmax(axis=1), probabilities=P))
    signal = recommend_stop(history, **stopping_options(loop))
    return {
        "stop": bool(signal.stop),
        "changed_fraction": signal.changed_share,
        "pool_predicted": _pack(P.argmax(axis=1)),
    }


def run(
    problem: Problem,
    spec: RunSpec,
    folder: Path,
    *,
    max_new_rounds: int | None = None,
    on_round: Callable[[], None] | None = None,
) -> int:
    """Run (or continue) one simulated campaign arm; returns the rounds it finished now.

    Args:
        problem: The prepared data.
        spec: What to run.
        folder: The campaign folder.
        max_new_rounds: Stop after this many new rounds (a simulated kill); None = all.
        on_round: Called after every finished round (in-process progress).

    Returns:
        Rounds finished by this call.
    """
    path = run_path(folder, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = read_records(path)
    budget = (
        spec.rounds - len(done)
        if max_new_rounds is None
        else min(max_new_rounds, spec.rounds - len(done))
    )
    if budget <= 0:
        return 0
    pool, test = problem.splits[spec.seed]
    if spec.strategy == FULL:
        model, train_s = _train(problem, spec, pool, None, 0)
        _append(
            path,
            _record(
                spec, 0, len(pool), len(pool), _evaluate(problem, model, test), [], 0.0, train_s
            ),
        )
        if on_round is not None:
            on_round()
        return 1

    # re-derive the state after the last finished round
    labelled_rows = [i for rec in done for i in rec["picked"]]
    previous: TrainedModel | _Constant | None = None
    if done:
        last = len(done) - 1
        model_file = _model_path(path, last)
        if model_file.exists():
            previous = TrainedModel.from_bytes(model_file.read_bytes())
        else:  # trained on < 2 classes, or written by a run without a model file
            previous, _ = _train(
                problem, spec, np.asarray(labelled_rows, dtype=np.int64), None, last
            )
            if isinstance(previous, TrainedModel):
                log.warning(
                    "%s: no model file for round %d; retrained from scratch", spec.name, last
                )
    for stale in path.parent.glob(f"{path.stem}.r*.model"):
        if stale != _model_path(path, len(done) - 1):
            stale.unlink()  # left by a kill between two steps of a round
    position = {int(r): i for i, r in enumerate(pool)}
    positions = _pool_positions(problem, pool)
    state = done[-1].get("strategy_state") if done else None
    uses_model = STRATEGIES[spec.strategy].needs_model
    X_pool = problem.X[pool]
    scaled_pool = problem.scaling.transform(X_pool)
    y_pool = problem.y[pool]
    semi = _Semi(problem, pool, scaled_pool) if split_head(spec.head)[1] else None
    loop = spec.loop
    kept = stopping_rounds(loop) - 1  # earlier rounds the stopping signal looks at
    history = list(done[-kept:])
    cached = None  # the pool predictions of the last model, made at the end of its round
    finished = 0
    for round_ in range(len(done), len(done) + budget):
        if round_ == 0:
            t0 = time.perf_counter()
            picked = _initial(problem, spec, pool)
        else:
            labelled = np.zeros(len(pool), dtype=bool)
            labelled[[position[i] for i in labelled_rows]] = True
            assert previous is not None
            P, hidden, members = (
                cached if cached is not None else _predict(previous, X_pool, scaled_pool)
            )
            k = spec.targets[round_] - spec.targets[round_ - 1]
            t0 = time.perf_counter()
            ctx = QueryContext(
                features=hidden if uses_model else scaled_pool,
                labelled=labelled,
                probabilities=P,
                member_probabilities=members,
                positions=positions,
                round=round_,
                labels=np.where(labelled, y_pool, -1),
                rater_disagreement=_rater_disagreement(
                    problem, spec, previous, labelled_rows, X_pool
                ),
            )
            if isinstance(
                previous, _Constant
            ):  # no model (one class): the live loop asks for more spots
                picked = pool[
                    select_query(
                        ctx,
                        strategy=MORE_CLASSES_STRATEGY,
                        query_size=k,
                        seed=spec.seed,
                        settings=loop,
                    ).indices
                ]
            else:
                selection = select_query(
                    ctx,
                    strategy=spec.strategy,
                    query_size=k,
                    seed=spec.seed,
                    settings=loop,
                    state=state,
                )
                picked, state = pool[selection.indices], selection.state
        query_s = time.perf_counter() - t0
        labelled_rows.extend(int(i) for i in picked)
        rows = np.asarray(labelled_rows, dtype=np.int64)
        model, train_s = _train(
            problem,
            spec,
            rows,
            previous if isinstance(previous, TrainedModel) else None,
            round_,
            semi,
        )
        metrics = _evaluate(problem, model, test)
        t0 = time.perf_counter()
        cached = _predict(model, X_pool, scaled_pool)
        predict_s = time.perf_counter() - t0
        extra = _stopping(history, cached[0], loop)
        extra["classes_labelled"] = int(len(np.unique(problem.y[rows])))
        if state is not None:
            extra["strategy_state"] = state
        if isinstance(model, TrainedModel):
            _write_atomic(_model_path(path, round_), model.to_bytes())
        record = _record(
            spec,
            round_,
            len(rows),
            len(pool),
            metrics,
            picked,
            query_s,
            train_s,
            predict_s,
            model.validation if isinstance(model, TrainedModel) else None,
            extra,
        )
        _append(path, record)
        history = [*history, record][-kept:]
        stale = _model_path(path, round_ - 1)
        if stale.exists():
            stale.unlink()
        previous = model
        finished += 1
        if on_round is not None:
            on_round()
    if len(done) + finished == spec.rounds:
        last_model = _model_path(path, spec.rounds - 1)
        if last_model.exists():
            last_model.unlink()  # finished: no next round to warm-start
    return finished
