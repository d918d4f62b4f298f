"""The Alembic migrations: upgrade from empty on SQLite and PostgreSQL, matching the models."""

from __future__ import annotations

from collections.abc import Callable

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from histoloop.annotation_store import models
from histoloop.annotation_store.db import (
    current_revision,
    downgrade,
    head_revision,
    make_engine,
    migrate,
)


def _tables(url: str) -> set[str]:
    engine = make_engine(url, write=False, pool_size=1)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_upgrade_from_empty_matches_the_models(new_database: Callable[..., str]) -> None:
    url = new_database(migrated=False)
    assert current_revision(url) is None and _tables(url) == set()
    migrate(url)
    assert current_revision(url) == head_revision()
    assert _tables(url) == set(models.Base.metadata.tables)
    engine = make_engine(url, write=False, pool_size=1)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), models.Base.metadata
            )
    finally:
        engine.dispose()
    assert diff == []
    migrate(url)  # idempotent at head


def test_downgrade_to_base_and_upgrade_again(new_database: Callable[..., str]) -> None:
    url = new_database(migrated=False)
    migrate(url)
    downgrade(url, "base")
    assert _tables(url) == set() and current_revision(url) is None
    migrate(url)
    assert _tables(url) == set(models.Base.metadata.tables)
