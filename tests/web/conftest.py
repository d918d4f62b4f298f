"""A real stack for the workspace tests: all six services embedded, with tokens, plus the web server.

One server per test session (token auth, so sign-in, sessions and the read-only role are
real): an admin creates a DLPFC 151510 project (expression features, 10 spots per query)
and a WSI project on CMU-1-Small-Region.svs, and registers two annotators and a viewer.
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import grpc
import pandas as pd
import pytest

from histoloop.config import load_settings
from histoloop.server import Server
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc, common_pb2
from histoloop.web import WebServer

LAYERS = ["Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM"]
COLOURS = ["#f0e442", "#e69f00", "#56b4e9", "#009e73", "#0072b2", "#d55e00", "#7f7f7f"]
PROJECT = "web-dlpfc"
OTHER = "web-other"
WSI_PROJECT = "web-wsi"
DATASET = "151510"


@dataclass
class Stack:
    """The running stack and what the tests need to reach it."""

    server: Server
    web: WebServer
    store: annotation_store_pb2_grpc.AnnotationStoreServiceStub
    admin: list[tuple[str, str]]
    tokens: dict[str, str] = field(default_factory=dict)
    truth: pd.Series | None = None

    @property
    def url(self) -> str:
        return self.web.url.rstrip("/")

    def wait_round(self, project: str, after: int, timeout: float = 120.0) -> pb.QuerySet:
        """The first query set of ``project`` with a round above ``after``."""
        arrivals: queue.Queue = queue.Queue()
        stream = self.store.WatchQuerySets(
            pb.WatchQuerySetsRequest(project_id=project, include_latest=True), metadata=self.admin
        )

        def pump() -> None:
            try:
                for query_set in stream:
                    arrivals.put(query_set)
            except grpc.RpcError:
                pass

        threading.Thread(target=pump, daemon=True).start()
        try:
            while True:
                query_set = arrivals.get(timeout=timeout)
                if query_set.round > after:
                    return query_set
        finally:
            stream.cancel()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Iterator[Stack]:
    admin_token = secrets.token_hex(16)
    settings = load_settings(
        data_dir=tmp_path_factory.mktemp("web"),
        grpc_port=0,
        metrics_port=0,
        web_port=0,
        auth="token",
        service_token=secrets.token_hex(16),
        admin_token=admin_token,
        web_viewers="viewer",
        web_max_batch=500,
    )
    server = Server(settings)
    server.start()
    web = WebServer(settings, store_address=f"127.0.0.1:{server.port}")
    server.companions.append(web)
    web.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    store = annotation_store_pb2_grpc.AnnotationStoreServiceStub(channel)
    admin = [("authorization", f"Bearer {admin_token}")]
    st = Stack(server=server, web=web, store=store, admin=admin)
    folder = shared_data / "dlpfc" / "151510"
    truth = ad.read_h5ad(folder / "dlpfc151510_500genes.h5ad").obs["layer"].astype("object")
    st.truth = truth[truth.notna()].astype(str)
    classes = [common_pb2.ClassDef(name=n, color=c) for n, c in zip(LAYERS, COLOURS, strict=True)]
    for project in (PROJECT, OTHER):
        store.CreateProject(
            pb.CreateProjectRequest(
                project_id=project,
                name=f"DLPFC 151510 ({project})",
                classes=classes,
                config=common_pb2.LoopConfig(
                    features=common_pb2.FEATURE_SET_EXPRESSION, query_size=10
                ),
            ),
            metadata=admin,
        )
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=PROJECT,
            dataset_id=DATASET,
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(folder / "spatial"),
            expression_path=str(folder / "dlpfc151510_500genes.h5ad"),
        ),
        metadata=admin,
    )
    store.CreateProject(
        pb.CreateProjectRequest(
            project_id=WSI_PROJECT,
            name="CMU-1 small region",
            classes=classes[:3],
            config=common_pb2.LoopConfig(query_size=10),
        ),
        metadata=admin,
    )
    store.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=WSI_PROJECT,
            dataset_id="cmu1",
            kind=common_pb2.DATASET_KIND_WSI,
            slide_path=str(shared_data / "wsi" / "CMU-1-Small-Region.svs"),
            tile_size=224,
        ),
        metadata=admin,
    )
    for name, role, projects in (
        ("ann-a", pb.ANNOTATOR_ROLE_ANNOTATOR, [PROJECT, WSI_PROJECT]),
        ("ann-b", pb.ANNOTATOR_ROLE_ANNOTATOR, [PROJECT]),
        ("viewer", pb.ANNOTATOR_ROLE_ANNOTATOR, [PROJECT]),
        ("other", pb.ANNOTATOR_ROLE_ANNOTATOR, [OTHER]),
    ):
        reply = store.RegisterAnnotator(
            pb.RegisterAnnotatorRequest(
                annotator_id=name, display_name=name, role=role, projects=projects
            ),
            metadata=admin,
        )
        st.tokens[name] = reply.token
    st.wait_round(PROJECT, -1)
    yield st
    channel.close()
    server.stop(5)
