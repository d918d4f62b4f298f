"""An embedded server with all six services, and a client for the DLPFC loop."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import anndata as ad
import grpc
import pandas as pd
import pytest

from histoloop.config import load_settings
from histoloop.server import Server
from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc, common_pb2

LAYERS = ["Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        load_settings(data_dir=tmp_path_factory.mktemp("loop"), grpc_port=0, metrics_port=0)
    )
    srv.start()
    yield srv
    srv.stop(5)


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch


@pytest.fixture(scope="module")
def store(channel: grpc.Channel) -> annotation_store_pb2_grpc.AnnotationStoreServiceStub:
    return annotation_store_pb2_grpc.AnnotationStoreServiceStub(channel)


@pytest.fixture(scope="module")
def dlpfc(shared_data: Path) -> tuple[Path, pd.Series]:
    folder = shared_data / "dlpfc" / "151510"
    truth = ad.read_h5ad(folder / "dlpfc151510_500genes.h5ad").obs["layer"].astype("object")
    return folder, truth[truth.notna()].astype(str)


class Watch:
    """Query sets of one project as WatchQuerySets streams them."""

    def __init__(
        self, stub: annotation_store_pb2_grpc.AnnotationStoreServiceStub, project: str
    ) -> None:
        self.arrivals: queue.Queue = queue.Queue()
        self._stream = stub.WatchQuerySets(
            pb.WatchQuerySetsRequest(project_id=project, include_latest=True)
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            for query_set in self._stream:
                self.arrivals.put(query_set)
        except grpc.RpcError:
            pass

    def next_round(self, after: int, timeout: float = 120) -> pb.QuerySet:
        while True:
            query_set = self.arrivals.get(timeout=timeout)
            if query_set.round > after:
                return query_set

    def close(self) -> None:
        self._stream.cancel()


def start_project(stub, folder: Path, project: str, **config) -> Watch:
    """Create a DLPFC project, start watching it, register the sample."""
    stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project,
            name=project,
            classes=[common_pb2.ClassDef(name=n) for n in LAYERS],
            config=common_pb2.LoopConfig(features=common_pb2.FEATURE_SET_EXPRESSION, **config),
        )
    )
    watch = Watch(stub, project)
    stub.RegisterDataset(
        pb.RegisterDatasetRequest(
            project_id=project,
            dataset_id="151510",
            kind=common_pb2.DATASET_KIND_VISIUM,
            spatial_dir=str(folder / "spatial"),
            expression_path=str(folder / "dlpfc151510_500genes.h5ad"),
        )
    )
    return watch


def answer(query_set: pb.QuerySet, truth: pd.Series) -> list[pb.SpotLabel]:
    """The pathologist's answers (the manual layer annotation)."""
    return [
        pb.SpotLabel(barcode=s.barcode, label=truth[s.barcode])
        for s in query_set.spots
        if s.barcode in truth.index
    ]
