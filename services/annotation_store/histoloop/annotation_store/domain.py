"""Domain types of the annotation store (plain dataclasses; no transport, no database).

The servicer converts protobuf messages to and from these; the repository reads and
writes them. Validation of names and loop settings lives here so that every entry point
(gRPC, Loupe CSV, events) applies the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from histoloop.errors import InvalidArgument
from histoloop.formats.vocab import (
    COLD_START_STRATEGIES,
    CONSENSUS_RULES,
    DEFAULT_AUGMENT_VIEWS,
    DEFAULT_COLD_START,
    DEFAULT_CONSENSUS,
    DEFAULT_FEATURES,
    DEFAULT_HEAD,
    DEFAULT_QUERY_SIZE,
    DEFAULT_RESAMPLING,
    DEFAULT_SPATIAL_NEIGHBOURS,
    DEFAULT_STOP_MAX_CHANGE,
    DEFAULT_STRATEGY,
    FEATURE_SETS,
    HEADS,
    MAX_AUGMENT_VIEWS,
    MAX_QUERY_SIZE,
    RESAMPLING,
    STRATEGIES,
    ConsensusRule,
)
from histoloop.presets import loop_defaults

__all__ = [
    "CONSENSUS_RULES",
    "DEFAULT_AUGMENT_VIEWS",
    "DEFAULT_COLORS",
    "FEATURE_SETS",
    "HEADS",
    "HELP_LABEL",
    "MAX_AUGMENT_VIEWS",
    "RESAMPLING",
    "AgreementReport",
    "BatchResult",
    "ClassSpec",
    "ConfigChange",
    "ConsensusRule",
    "DatasetInfo",
    "DatasetKind",
    "DatasetSpec",
    "LabelSource",
    "LoopSettings",
    "PairKappa",
    "ProjectInfo",
    "ProjectStatus",
    "QuerySetRecord",
    "QuerySpot",
    "SpotLabelInput",
    "check_id",
    "check_class_name",
]

HELP_LABEL = "help"
"""Loupe placeholder marking a spot the model asks about; never a class name."""

# CONSENSUS_RULES, RESAMPLING, HEADS, FEATURE_SETS: the shared vocabulary (histoloop.formats.vocab)
DatasetKind = Literal["visium", "wsi"]
LabelSource = Literal["grpc", "loupe_csv", "correction"]

# Loupe-like categorical palette (tab10 + a few), used when a class comes without a colour.
DEFAULT_COLORS: tuple[str, ...] = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
)

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_NAME_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}$")
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_MAX_SEED = 2**63 - 1


def check_id(value: str, field_name: str, *, project: bool = False) -> str:
    """Return ``value`` if it is a valid project (``[a-z0-9][a-z0-9-]{0,62}``) or other id.

    Raises:
        InvalidArgument: naming ``field_name``.
    """
    pattern = _ID if project else _NAME_ID
    if not isinstance(value, str) or not pattern.match(value):
        rule = "[a-z0-9][a-z0-9-]{0,62}" if project else "[A-Za-z0-9][A-Za-z0-9_.@+-]{0,127}"
        raise InvalidArgument(f"{field_name}: {value!r} is not a valid id ({rule})")
    return value


def check_class_name(name: str, field_name: str = "class") -> str:
    """Return the stripped class name if valid (1–128 printable characters, not ``help``)."""
    stripped = name.strip() if isinstance(name, str) else ""
    if not stripped:
        raise InvalidArgument(f"{field_name}: a class name must not be empty")
    if len(stripped) > 128:
        raise InvalidArgument(
            f"{field_name}: class name {stripped[:40]!r}… is longer than 128 characters"
        )
    if not stripped.isprintable():
        raise InvalidArgument(f"{field_name}: class name {stripped!r} has control characters")
    if stripped.lower() == HELP_LABEL:
        raise InvalidArgument(
            f"{field_name}: {HELP_LABEL!r} is Loupe's placeholder, not a class name"
        )
    return stripped


@dataclass(frozen=True)
class ClassSpec:
    """A class of a project's schema."""

    name: str
    color: str = ""
    """``#rrggbb``; empty picks the next colour of :data:`DEFAULT_COLORS`."""

    def validated(self, field_name: str, position: int) -> ClassSpec:
        """This class with a checked name and a colour (defaulted by ``position``)."""
        name = check_class_name(self.name, field_name)
        color = self.color.strip()
        if not color:
            color = DEFAULT_COLORS[position % len(DEFAULT_COLORS)]
        elif not _COLOR.match(color):
            raise InvalidArgument(f"{field_name}.color: {color!r} is not #rrggbb")
        return ClassSpec(name=name, color=color.lower())


_ZERO_IS_A_VALUE = frozenset({"augment_views", "spatial_neighbours"})  # 0 = off, None = unset


@dataclass(frozen=True)
class LoopSettings:
    """A project's loop configuration (the ``LoopConfig`` proto), with the store's defaults.

    Strategy, cold start, query size, head and spatial neighbours default to
    :data:`histoloop.presets.DEFAULTS` (chosen by evidence: the activevisium two-stage
    query, k-means cold start, 20 spots per round, the MLP head with its new training
    settings, the 6 nearest spots' mean features), or to the values of ``preset``
    (``activevisium``: the paper's loop, MLP trained as in the paper, no neighbour
    features). Features default to image embeddings
    (``morphology``: works for every dataset, with or without an expression matrix); no
    resampling, no pseudo-labels, and ``latest_expert`` consensus (one pathologist: the
    latest label wins, so corrections take effect; with several, an expert's or admin's
    latest label wins over annotators'). Augmented views (``augment_views``, 0 = off) are
    off by default and 10 under the ``activevisium`` preset (each costs one more embedding pass).
    """

    strategy: str = DEFAULT_STRATEGY
    cold_start_strategy: str = DEFAULT_COLD_START
    query_size: int = DEFAULT_QUERY_SIZE
    seed: int = 0
    head: str = DEFAULT_HEAD
    features: str = DEFAULT_FEATURES
    spatial_neighbours: int = DEFAULT_SPATIAL_NEIGHBOURS
    resampling: str = DEFAULT_RESAMPLING
    consensus: str = DEFAULT_CONSENSUS
    adjudication_share: float = 0.0
    compactness: float = 0.0
    smoothing: float = 0.0
    preset: str = ""
    semi_supervised: float = 0.0
    hybrid_share: float = 0.7
    kmeans_pick: str = "closest_to_centroid"
    mc_dropout_samples: int = 0
    stop_max_change: float = DEFAULT_STOP_MAX_CHANGE
    stop_min_kappa: float = 0.95
    stop_patience: int = 2
    stop_max_uncertainty: float = 0.0
    resampling_every: int = 5
    harmony: bool = False
    augment_views: int = DEFAULT_AUGMENT_VIEWS

    @classmethod
    def with_defaults(cls, **given: object) -> LoopSettings:
        """Settings from possibly-unset values (``""``/``0``/None take the default), validated.

        The defaults are those of ``given["preset"]`` (:func:`histoloop.presets.loop_defaults`).
        """
        base = cls(**loop_defaults(str(given.get("preset") or "")))  # type: ignore[arg-type]
        values = {
            k: v
            for k, v in given.items()
            if v not in (None, "", 0, 0.0) or (k in _ZERO_IS_A_VALUE and v is not None)
        }
        merged = cls(**{**base.__dict__, **values})  # type: ignore[arg-type]
        return merged.validate()

    def validate(self) -> LoopSettings:
        """Check every field; raise :class:`InvalidArgument` naming the first bad one."""
        _name_field("config.strategy", self.strategy)
        _choice("config.strategy", self.strategy, STRATEGIES)
        _name_field("config.cold_start_strategy", self.cold_start_strategy)
        if self.cold_start_strategy not in COLD_START_STRATEGIES:
            raise InvalidArgument(
                f"config.cold_start_strategy: {self.cold_start_strategy!r} is not a strategy that "
                f"works without a model ({', '.join(COLD_START_STRATEGIES)})"
            )
        if not 1 <= self.query_size <= MAX_QUERY_SIZE:
            raise InvalidArgument(
                f"config.query_size: {self.query_size} is not in 1..{MAX_QUERY_SIZE}"
            )
        if not 0 <= self.seed <= _MAX_SEED:
            raise InvalidArgument(f"config.seed: {self.seed} is not in 0..2^63-1")
        _choice("config.head", self.head, HEADS)
        _choice("config.features", self.features, FEATURE_SETS)
        if self.head == "multimodal" and self.features != "multimodal":
            raise InvalidArgument(
                f"config.head: 'multimodal' learns from image and expression together; "
                f"config.features is {self.features!r} (set it to multimodal, or choose another head)"
            )
        if not 0 <= self.spatial_neighbours <= 1000:
            raise InvalidArgument(
                f"config.spatial_neighbours: {self.spatial_neighbours} is not in 0..1000"
            )
        _choice("config.resampling", self.resampling, RESAMPLING)
        _choice("config.consensus", self.consensus, CONSENSUS_RULES)
        if not 0.0 <= self.adjudication_share <= 1.0:
            raise InvalidArgument(
                f"config.adjudication_share: {self.adjudication_share} is not in [0, 1]"
            )
        if not 0.0 <= self.compactness <= 1.0:
            raise InvalidArgument(f"config.compactness: {self.compactness} is not in [0, 1]")
        if not 0.0 <= self.smoothing <= 1.0:
            raise InvalidArgument(f"config.smoothing: {self.smoothing} is not in [0, 1]")
        _check_issue17_settings(self)
        loop_defaults(self.preset)  # raises naming config.preset
        if not 0.0 <= self.semi_supervised < 1.0:
            raise InvalidArgument(
                f"config.semi_supervised: {self.semi_supervised} is not in [0, 1)"
            )
        if not 0 <= self.augment_views <= MAX_AUGMENT_VIEWS:
            raise InvalidArgument(
                f"config.augment_views: {self.augment_views} is not in 0..{MAX_AUGMENT_VIEWS}"
            )
        return self


KMEANS_PICKS: tuple[str, ...] = ("closest_to_centroid", "far_from_centre")


def _check_issue17_settings(settings: LoopSettings) -> None:
    """The acquisition, uncertainty and stopping settings (LoopConfig fields 30–37)."""
    for name in ("hybrid_share", "stop_max_change", "stop_min_kappa", "stop_max_uncertainty"):
        value = getattr(settings, name)
        if not 0.0 <= value <= 1.0:
            raise InvalidArgument(f"config.{name}: {value} is not in [0, 1]")
    _choice("config.kmeans_pick", settings.kmeans_pick, KMEANS_PICKS)
    if not 0 <= settings.mc_dropout_samples <= 1000:
        raise InvalidArgument(
            f"config.mc_dropout_samples: {settings.mc_dropout_samples} is not in 0..1000"
        )
    if not 1 <= settings.stop_patience <= 100:
        raise InvalidArgument(f"config.stop_patience: {settings.stop_patience} is not in 1..100")
    if not 1 <= settings.resampling_every <= 1000:
        raise InvalidArgument(
            f"config.resampling_every: {settings.resampling_every} is not in 1..1000"
        )


def _name_field(field_name: str, value: str) -> None:
    if not re.match(r"^[a-z0-9][a-z0-9_.-]{0,63}$", value):
        raise InvalidArgument(
            f"{field_name}: {value!r} is not a valid name ([a-z0-9_.-], at most 64)"
        )


def _choice(field_name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise InvalidArgument(f"{field_name}: {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class ProjectInfo:
    """A project as stored."""

    project_id: str
    name: str
    classes: tuple[ClassSpec, ...]
    config: LoopSettings
    created_at: datetime
    datasets: tuple[str, ...]
    label_version: int


@dataclass(frozen=True)
class DatasetSpec:
    """What RegisterDataset asks for."""

    project_id: str
    dataset_id: str
    kind: DatasetKind
    slide_path: str = ""
    spatial_dir: str = ""
    expression_path: str = ""
    slide_scale: float = 1.0
    context: float = 1.0
    mpp: float = 0.0
    tile_size: int = 0


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as stored."""

    project_id: str
    dataset_id: str
    kind: DatasetKind
    n_spots: int
    n_in_tissue: int
    slide_uri: str
    spatial_uri_prefix: str
    expression_uri: str
    embeddings_uri: str
    registered_at: datetime
    removed_at: datetime | None = None
    """Set once RemoveDataset took it out of the pool (its labels stay in the history)."""
    removed_by: str = ""
    embedding_model: str = ""
    embedding_model_version: str = ""
    embedding_dim: int = 0


@dataclass(frozen=True)
class SpotLabelInput:
    """One label of a batch; ``row`` names it in errors (CSV line or list index)."""

    barcode: str
    label: str
    row: str


@dataclass(frozen=True)
class BatchResult:
    """The result of committing a label batch (stored; returned again for a duplicate)."""

    batch_id: str
    n_labels: int
    label_version: int
    duplicate: bool
    event_id: str
    n_placeholders: int = 0
    n_empty: int = 0
    """Loupe rows with an empty label (spots outside the category): skipped, and said so."""


@dataclass(frozen=True)
class QuerySpot:
    """A spot of a query set."""

    barcode: str
    score: float = 0.0
    dataset: str = ""
    reason: str = ""


@dataclass(frozen=True)
class QuerySetRecord:
    """A query set (from ``queryset.ready``)."""

    queryset_id: str
    project_id: str
    round: int
    strategy: str
    model_version: str
    spots: tuple[QuerySpot, ...]
    label_version: int = 0
    queryset_uri: str = ""
    predictions_uri: str = ""
    metrics: Mapping[str, object] = field(default_factory=dict)
    """``ModelMetrics`` as a JSON object (proto field names)."""
    stopping: Mapping[str, object] = field(default_factory=dict)
    """``StoppingSignal`` as a JSON object (proto field names)."""
    created_at: datetime | None = None


@dataclass(frozen=True)
class ProjectStatus:
    """GetStatus: where a project's loop stands."""

    project_id: str
    round: int
    labelled_per_class: Mapping[str, int]
    n_labelled: int
    n_spots: int
    label_version: int
    latest_model_version: str
    latest_metrics: Mapping[str, object]
    stopping: Mapping[str, object]
    n_disputed: int
    pending_events: int
    notice: str = ""
    """Why the loop is not training yet (empty: nothing to say)."""


@dataclass(frozen=True)
class PairKappa:
    """Cohen's kappa of two annotators over the spots both labelled."""

    annotator_a: str
    annotator_b: str
    kappa: float
    n_common: int


@dataclass(frozen=True)
class AgreementReport:
    """GetAgreement: inter-rater agreement of a project (or one dataset)."""

    fleiss_kappa: float
    cohen: tuple[PairKappa, ...]
    n_spots_multi_rated: int
    n_disputed: int
    disputed: tuple[str, ...]
    reliability: Mapping[str, float]
    rater_confusion: tuple[Any, ...] = ()
    """One :class:`~histoloop.annotation_store.raters.RaterConfusion` per annotator."""
    confusion_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigChange:
    """One UpdateProject change of a project's loop config (the audit history)."""

    before: LoopSettings
    after: LoopSettings
    changed_by: str
    changed_at: datetime
    reason: str
    from_label_version: int
    """The first label version (round) whose ``labels.committed`` carries ``after``."""
