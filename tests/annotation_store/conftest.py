"""Fixtures of the annotation store tests: every test runs on SQLite and on real PostgreSQL.

Each test gets a fresh, migrated database: a copy of a migrated SQLite file, or a
PostgreSQL database created from a migrated template (``CREATE DATABASE … TEMPLATE``,
a few ms) and dropped afterwards. PostgreSQL must be reachable (127.0.0.1:5432, trust
auth, user ``postgres`` or ``root``; override with ``HISTOLOOP_TEST_PG``): the suite fails
rather than skips without it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from histoloop.annotation_store.db import Database, migrate
from histoloop.annotation_store.domain import ClassSpec, DatasetSpec, LoopSettings
from histoloop.annotation_store.repository import AnnotationRepository
from histoloop.artifacts.local import LocalArtifactStore
from histoloop.bus.embedded import EmbeddedBus
from histoloop.v1 import annotation_store_pb2_grpc

BACKENDS = ("sqlite", "postgres")
REPO_ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")
DLPFC = "dlpfc/151510"


# databases -------------------------------------------------------------------------------
def _pg_candidates() -> list[str]:
    given = os.environ.get("HISTOLOOP_TEST_PG")
    if given:
        return [given]
    return [f"host=127.0.0.1 port=5432 user={user} dbname=test" for user in ("postgres", "root")]


@pytest.fixture(scope="session")
def pg_conninfo() -> str:
    """A libpq conninfo of the test server (admin rights: CREATE DATABASE)."""
    errors = []
    for conninfo in _pg_candidates():
        try:
            with psycopg.connect(conninfo, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
            return conninfo
        except psycopg.Error as exc:
            errors.append(f"{conninfo}: {exc}")
    pytest.fail("PostgreSQL is required for the annotation store tests: " + "; ".join(errors))


def _pg_url(conninfo: str, dbname: str) -> str:
    params = dict(part.split("=", 1) for part in conninfo.split())
    user = params.get("user", "postgres")
    password = f":{params['password']}" if "password" in params else ""
    return (
        f"postgresql+psycopg://{user}{password}@{params.get('host', '127.0.0.1')}:"
        f"{params.get('port', '5432')}/{dbname}"
    )


def _pg_admin(conninfo: str, sql: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


@dataclass
class PgServer:
    """Creates and drops test databases on the PostgreSQL server."""

    conninfo: str
    template: str

    def create(self, *, from_template: bool = True) -> tuple[str, str]:
        name = f"histoloop_test_{uuid.uuid4().hex[:12]}"
        template = f" TEMPLATE {self.template}" if from_template else ""
        _pg_admin(self.conninfo, f"CREATE DATABASE {name}{template}")
        return name, _pg_url(self.conninfo, name)

    def drop(self, name: str) -> None:
        _pg_admin(self.conninfo, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def pg_server(pg_conninfo: str) -> Iterator[PgServer]:
    """A migrated template database for this session (dropped at the end)."""
    template = f"histoloop_test_tpl_{uuid.uuid4().hex[:8]}"
    _pg_admin(pg_conninfo, f"CREATE DATABASE {template}")
    server = PgServer(pg_conninfo, template)
    try:
        migrate(_pg_url(pg_conninfo, template))
        yield server
    finally:
        server.drop(template)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied for each test."""
    path = tmp_path_factory.mktemp("sqlite-template") / "store.sqlite"
    migrate(f"sqlite:///{path}")
    return path


@pytest.fixture(params=BACKENDS, ids=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgres``: every test using the database runs on both."""
    return str(request.param)


@pytest.fixture
def new_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., str]]:
    """Factory of fresh databases of the current backend: ``new_database(migrated=True) -> url``."""
    created: list[str] = []
    server: PgServer | None = (
        request.getfixturevalue("pg_server") if backend == "postgres" else None
    )
    template: Path | None = (
        request.getfixturevalue("sqlite_template") if backend == "sqlite" else None
    )

    def make(*, migrated: bool = True) -> str:
        if server is not None:
            name, url = server.create(from_template=migrated)
            created.append(name)
            return url
        assert template is not None
        path = tmp_path / f"store-{len(created)}.sqlite"
        created.append(str(path))
        if migrated:
            shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    yield make
    if server is not None:
        for name in created:
            server.drop(name)


@pytest.fixture
def db_url(new_database: Callable[..., str]) -> str:
    """A fresh migrated database of the current backend."""
    return new_database()


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url, pool_size=5)
    yield database
    database.close()


@pytest.fixture
def artifacts(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts")


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[EmbeddedBus]:
    event_bus = EmbeddedBus(tmp_path / "events.sqlite")
    yield event_bus
    event_bus.close()


@pytest.fixture
def repo(db: Database, artifacts: LocalArtifactStore) -> AnnotationRepository:
    return AnnotationRepository(db, artifacts)


# data ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def dlpfc_spatial(shared_data: Path) -> Path:
    """The real DLPFC 151510 Space Ranger spatial/ folder (tissue_positions_list.csv, no header)."""
    return shared_data / DLPFC / "spatial"


def barcode(i: int, suffix: str = "1") -> str:
    """A synthetic Visium-like barcode."""
    alphabet = "ACGT"
    core = "".join(alphabet[(i >> (2 * k)) & 3] for k in range(16))
    return f"{core}-{suffix}"


def write_spatial(folder: Path, barcodes: list[str], *, header: bool = True) -> Path:
    """A minimal spatial/ folder (tissue_positions.csv with header, or the old name without)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = (
        ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"]
        if header
        else []
    )
    for i, bc in enumerate(barcodes):
        lines.append(
            f"{bc},{1 if i % 10 else 0},{i // 8},{(i % 8) * 2},{100 + 10 * i},{200 + 5 * i}"
        )
    name = "tissue_positions.csv" if header else "tissue_positions_list.csv"
    (folder / name).write_text("\n".join(lines) + "\n")
    (folder / "scalefactors_json.json").write_text(
        '{"spot_diameter_fullres": 89.4, "tissue_hires_scalef": 0.15}'
    )
    return folder


@pytest.fixture(scope="session")
def small_spatial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic spots (barcode(0..39)), header form."""
    return write_spatial(
        tmp_path_factory.mktemp("small") / "spatial", [barcode(i) for i in range(40)]
    )


@pytest.fixture(scope="session")
def other_spatial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 synthetic spots with barcodes the small dataset does not have (old headerless form)."""
    return write_spatial(
        tmp_path_factory.mktemp("other") / "spatial",
        [barcode(i, "2") for i in range(20)],
        header=False,
    )


def new_project_id() -> str:
    return f"p-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def project(repo: AnnotationRepository, small_spatial: Path) -> str:
    """A project with the DLPFC layer classes and the small dataset ``ds1``."""
    project_id = new_project_id()
    repo.create_project(project_id, "test", [ClassSpec(c) for c in LAYERS], LoopSettings())
    repo.register_dataset(
        DatasetSpec(
            project_id=project_id, dataset_id="ds1", kind="visium", spatial_dir=str(small_spatial)
        )
    )
    return project_id


# gRPC ------------------------------------------------------------------------------------
@dataclass
class GrpcEnv:
    """A running server (the lead's scaffold) with the annotation store, and its tokens."""

    server: object
    port: int
    admin_token: str
    service_token: str
    channel: grpc.Channel
    stub: annotation_store_pb2_grpc.AnnotationStoreServiceStub
    data_dir: Path

    def md(self, token: str | None) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {token}")] if token else []


@pytest.fixture
def grpc_env(db_url: str, tmp_path: Path) -> Iterator[GrpcEnv]:
    """``histoloop.server.Server`` running only the annotation store, auth on, on a free port."""
    from histoloop.config import Settings
    from histoloop.server import Server

    admin, service = "adm-" + secrets.token_hex(8), "svc-" + secrets.token_hex(8)
    settings = Settings(
        data_dir=tmp_path / "state",
        grpc_port=0,
        metrics_port=0,
        database_url=db_url,
        auth="token",
        admin_token=admin,
        service_token=service,
        grace_seconds=2.0,
    )
    server = Server(settings, ["annotation_store"])
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield GrpcEnv(
            server=server,
            port=server.port,
            admin_token=admin,
            service_token=service,
            channel=channel,
            stub=annotation_store_pb2_grpc.AnnotationStoreServiceStub(channel),
            data_dir=tmp_path / "state",
        )
    finally:
        channel.close()
        server.stop(1.0)
