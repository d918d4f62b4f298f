"""Recovery without deleting anything: see each stage's state, retry what was parked.

The event workers of every service record each stage's state and park events they cannot
handle in the shared artifact store (:mod:`histoloop.stages`); this module reads them for
``GetStatus`` and republishes parked events for ``RetryStage`` with the project's current
loop config, so a fix made with ``UpdateProject`` (or a re-registered input) applies.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from histoloop.annotation_store.convert import loop_settings_from_proto, loop_settings_to_proto
from histoloop.annotation_store.domain import LoopSettings
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.bus.base import EventBus
from histoloop.errors import FailedPrecondition, InvalidArgument
from histoloop.stages import (
    STAGE_OF_GROUP,
    DeadLetter,
    StageRecord,
    latest_states,
    list_dead_letters,
    read_states,
    retry_parked,
)
from histoloop.v1 import common_pb2

__all__ = ["Recovery", "merge_config"]

log = logging.getLogger(__name__)


def merge_config(
    current: LoopSettings, update: common_pb2.LoopConfig, reset_fields: Sequence[str] = ()
) -> LoopSettings:
    """``current`` with the fields ``update`` sets, validated (UpdateProject).

    Fields ``update`` leaves empty/zero keep their current value, except those named in
    ``reset_fields``, which take ``update``'s value (empty/zero: the default).

    Raises:
        InvalidArgument: an unknown name in ``reset_fields``, or a bad value (named).
    """
    merged = loop_settings_to_proto(current)
    names = set(common_pb2.LoopConfig.DESCRIPTOR.fields_by_name)
    for i, name in enumerate(reset_fields):
        if name not in names:
            raise InvalidArgument(
                f"reset_fields[{i}]: {name!r} is not a LoopConfig field "
                f"({', '.join(sorted(names))})"
            )
        merged.ClearField(name)
    for field, value in update.ListFields():
        setattr(merged, field.name, value)
    for name in reset_fields:
        setattr(merged, name, getattr(update, name))
    return loop_settings_from_proto(merged)


class Recovery:
    """Stage states, parked events and RetryStage of one annotation store."""

    def __init__(self, repo: AnnotationRepository, bus: EventBus | None) -> None:
        """Read and retry through ``repo``'s artifact store; publish retries on ``bus``."""
        self._repo = repo
        self._bus = bus

    def stages(self, project_id: str) -> list[StageRecord]:
        """The latest state per stage and dataset of a project (NotFound if no project)."""
        self._repo.get_project(project_id)
        return latest_states(read_states(self._repo.artifacts, project_id, latest_only=True))

    def parked(self, project_id: str) -> list[DeadLetter]:
        """The project's parked events not yet retried, oldest first."""
        return [d for d in list_dead_letters(self._repo.artifacts, project_id) if not d.retried]

    def retry(self, project_id: str, stage: str, dataset_id: str = "") -> list[str]:
        """Republish a stage's parked events (with the current config); the new event ids.

        Raises:
            NotFound: no such project.
            InvalidArgument: ``stage`` is not a stage.
            FailedPrecondition: nothing of that stage is parked.
        """
        if stage not in STAGE_OF_GROUP.values():
            raise InvalidArgument(
                f"stage: {stage!r} is not one of {', '.join(STAGE_OF_GROUP.values())}"
            )
        project = self._repo.get_project(project_id)
        if self._bus is None:
            raise FailedPrecondition("this annotation store has no event bus to republish on")
        ids = retry_parked(
            self._repo.artifacts,
            self._bus,
            project_id,
            stage,
            dataset=dataset_id,
            config=loop_settings_to_proto(project.config),
        )
        if not ids:
            where = f" for dataset {dataset_id!r}" if dataset_id else ""
            raise FailedPrecondition(
                f"stage: nothing of project {project_id!r} is parked in {stage}{where}"
            )
        log.info("project %s: %d parked %s event(s) republished", project_id, len(ids), stage)
        return ids
