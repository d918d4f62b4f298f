"""The annotation store's domain operations over its database and the artifact store.

Every mutating operation is one unit of work (:meth:`Database.write`): everything is
validated first, then written in a single transaction together with the outbox row that
announces it, so a rejected request changes nothing and a committed one is never lost
nor announced twice. No transport code here: the servicer maps requests to these calls.

:class:`AnnotationRepository` is one facade over a room per aggregate, each a mixin over
:class:`~.repo_base.RepositoryBase` (the database, artifact store and caches they share):

- :mod:`.repo_projects` — projects, class schema, config history, annotators and tokens;
- :mod:`.repo_datasets` — dataset registration and ingest, WSI tiles, unit layout, removal;
- :mod:`.repo_labels` — label commit, Loupe import, consensus, label snapshots;
- :mod:`.repo_querysets` — query sets and rounds, status, agreement, the CSV exports;
- :mod:`.repo_outbox` — the outbox rows the relay publishes, the relay lock.
"""

from __future__ import annotations

from histoloop.annotation_store.repo_base import EXPERT_ROLES, PRODUCER, PredictionsLoader
from histoloop.annotation_store.repo_datasets import DatasetsMixin
from histoloop.annotation_store.repo_labels import MAX_LABELS_PER_BATCH, LabelsMixin
from histoloop.annotation_store.repo_outbox import OutboxMixin, OutboxRow
from histoloop.annotation_store.repo_projects import ProjectsMixin
from histoloop.annotation_store.repo_querysets import QuerySetsMixin

__all__ = [
    "EXPERT_ROLES",
    "MAX_LABELS_PER_BATCH",
    "PRODUCER",
    "AnnotationRepository",
    "OutboxRow",
    "PredictionsLoader",
]


class AnnotationRepository(ProjectsMixin, DatasetsMixin, LabelsMixin, QuerySetsMixin, OutboxMixin):
    """Projects, datasets, annotators, labels, query sets and the outbox."""
