"""Database access: engines, units of work, migrations.

:class:`Database` hands out short transactions: :meth:`Database.read` and
:meth:`Database.write` are units of work that commit on success and roll back on any
exception, so a rejected batch leaves the store unchanged.

SQLite (the embedded default) gets WAL, foreign keys, a busy timeout and ``BEGIN
IMMEDIATE`` for write transactions (so concurrent writers queue for the lock instead of
failing on upgrade); PostgreSQL gets a connection pool sized for the gRPC thread pool.

:func:`migrate` runs the Alembic migrations to the latest revision; it is what the
service runs at start-up and what ``histoloop migrate`` calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from histoloop.errors import ConfigError, Unavailable

__all__ = [
    "MIGRATIONS_DIR",
    "Database",
    "current_revision",
    "downgrade",
    "head_revision",
    "make_engine",
    "migrate",
]

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATION_LOCK = 0x68697374  # "hist": serialises concurrent migrations of several replicas


def make_engine(url: str, *, write: bool = True, pool_size: int = 20) -> Engine:
    """An engine for ``url`` with the store's per-dialect settings.

    Args:
        url: SQLAlchemy URL (``sqlite:///…`` or ``postgresql+psycopg://…``).
        write: SQLite only: start transactions with ``BEGIN IMMEDIATE`` (write lock at once).
        pool_size: PostgreSQL connection pool size.

    Raises:
        ConfigError: the URL does not parse or names an unsupported database.
    """
    try:
        parsed = make_url(url)
    except SQLAlchemyError as exc:
        raise ConfigError(f"HISTOLOOP_DATABASE_URL does not parse: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 60, "check_same_thread": False})
        _sqlite_setup(engine, begin="BEGIN IMMEDIATE" if write else "BEGIN")
        return engine
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(
            parsed, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True
        )
    raise ConfigError(
        f"HISTOLOOP_DATABASE_URL: unsupported database {backend!r} (sqlite or postgresql)"
    )


def _sqlite_setup(engine: Engine, *, begin: str) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


class Database:
    """The store's database: a write engine, a read engine (the same one on PostgreSQL)."""

    def __init__(self, url: str, *, pool_size: int = 20) -> None:
        self.url = url
        self.engine = make_engine(url, write=True, pool_size=pool_size)
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            self._read_engine = make_engine(url, write=False)
        else:
            self._read_engine = self.engine
        # SQLite has one writer at a time; queueing for it here is fairer (and far less
        # tail latency) than SQLite's sleep-and-retry busy handler. Other processes still
        # wait through busy_timeout.
        self._write_lock: threading.Lock | None = (
            threading.Lock() if self.dialect == "sqlite" else None
        )
        self._write_sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._read_engine, expire_on_commit=False)

    @contextmanager
    def _writer(self) -> Iterator[None]:
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            yield

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A unit of work that may write: committed on success, rolled back on any error."""
        with self._writer(), self._write_sessions() as session, _translate_db_errors():
            with session.begin():
                yield session

    @contextmanager
    def write_conn(self) -> Iterator[Connection]:
        """A Core connection in a write transaction (the label-commit hot path: no ORM)."""
        with self._writer(), _translate_db_errors(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only unit of work (one snapshot on SQLite; rolled back at the end)."""
        with self._read_sessions() as session, _translate_db_errors():
            yield session

    def ping(self) -> None:
        """Raise :class:`Unavailable` if the database cannot answer ``SELECT 1``."""
        try:
            with self._read_engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except SQLAlchemyError as exc:
            raise Unavailable(f"annotation store database unreachable: {exc}") from exc

    def close(self) -> None:
        """Release every pooled connection; safe to call twice."""
        self.engine.dispose()
        if self._read_engine is not self.engine:
            self._read_engine.dispose()


@contextmanager
def _translate_db_errors() -> Iterator[None]:
    """Connection-level failures (down, locked, timed out) become :class:`Unavailable`."""
    try:
        yield
    except _operational_errors() as exc:
        raise Unavailable(f"annotation store database unavailable: {exc}") from exc


def _alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # '%' must be doubled for ConfigParser interpolation (passwords may contain it)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the latest).

    On PostgreSQL an advisory lock serialises replicas that start at the same time.

    Raises:
        ConfigError: the URL is not a supported database.
        Unavailable: the database cannot be reached.
    """
    from alembic import command

    engine = make_engine(url, write=True, pool_size=1)
    cfg = _alembic_config(url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
                conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
                conn.commit()
            finally:
                if engine.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_MIGRATION_LOCK})
                    conn.commit()
    except SQLAlchemyError as exc:
        if isinstance(exc, _operational_errors()):
            raise Unavailable(f"cannot migrate the annotation store database: {exc}") from exc
        raise
    finally:
        engine.dispose()
    log.info("annotation store database migrated to %s", revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` (tests and operators only)."""
    from alembic import command

    engine = make_engine(url, write=True, pool_size=1)
    try:
        with engine.connect() as conn:
            cfg = _alembic_config(url)
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            conn.commit()
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, write=False, pool_size=1)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The latest revision among the migration scripts."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None
    return head


def _operational_errors() -> tuple[type[Exception], ...]:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return (OperationalError, InterfaceError)
