"""Query-set records in the artifact store: ``querysets/<project>/r<round>-<id>.json``.

Acquisition writes one JSON record per query set (its round, strategy, model, spots and
stopping signal); the zero-padded round keeps a listing in round order.
"""

from __future__ import annotations

from histoloop.artifacts import validate_key

__all__ = ["QUERYSETS_ROOT", "queryset_key", "querysets_prefix"]

QUERYSETS_ROOT = "querysets"


def querysets_prefix(project: str) -> str:
    """``querysets/<project>/``: every query set of a project."""
    return f"{QUERYSETS_ROOT}/{project}/"


def queryset_key(project: str, round_no: int, queryset_id: str) -> str:
    """Key of one query set's record."""
    return validate_key(f"{querysets_prefix(project)}r{round_no:06d}-{queryset_id}.json")
