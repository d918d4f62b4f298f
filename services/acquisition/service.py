"""Wiring of the acquisition service: servicer, event handlers, health checks."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import grpc

from histoloop import events
from histoloop.acquisition.loop import Acquisition, check_query_args
from histoloop.acquisition.strategies import list_strategies
from histoloop.auth import require_project
from histoloop.datasets import read_anndata
from histoloop.errors import InvalidArgument
from histoloop.runtime import Runtime, ServiceParts
from histoloop.v1 import acquisition_pb2, acquisition_pb2_grpc, common_pb2

__all__ = ["AcquisitionServicer", "build"]


class AcquisitionServicer(acquisition_pb2_grpc.AcquisitionServiceServicer):
    """Thin proto ↔ domain layer."""

    def __init__(self, acquisition: Acquisition, simulations_dir: Path | None = None) -> None:
        self.acquisition = acquisition
        self.simulations_dir = simulations_dir

    def ListStrategies(self, request: acquisition_pb2.ListStrategiesRequest,
                       context: grpc.ServicerContext) -> acquisition_pb2.ListStrategiesResponse:
        return acquisition_pb2.ListStrategiesResponse(strategies=[
            acquisition_pb2.StrategyInfo(name=s.name, description=s.description, needs_model=s.needs_model)
            for s in list_strategies()
        ])

    def Query(self, request: acquisition_pb2.QueryRequest,
              context: grpc.ServicerContext) -> acquisition_pb2.QueryResponse:
        """A what-if query set on the latest predictions (not announced, not recorded)."""
        check_query_args(request.project_id, request.query_size)
        require_project(request.project_id)
        latest = self.acquisition.latest(request.project_id)
        config = common_pb2.LoopConfig(strategy=latest.strategy)
        record = self.acquisition.compute(
            request.project_id, latest.predictions_uri, latest.labels_uri, config,
            queryset_id=events.derived_id(latest.queryset_id, f"query/{request.strategy}/{request.seed}"),
            label_version=latest.label_version, strategy=request.strategy,
            query_size=request.query_size, seed=request.seed)
        return acquisition_pb2.QueryResponse(
            queryset_id=record.queryset_id, strategy=record.strategy,
            spots=[common_pb2.ScoredSpot(**s) for s in record.spots])


    def Simulate(self, request: acquisition_pb2.SimulateRequest,
                 context: grpc.ServicerContext) -> acquisition_pb2.SimulateResponse:
        """A simulated campaign, run here and now (bounded size; see :mod:`.simulation`)."""
        from histoloop.acquisition import simulation

        if bool(request.embeddings_uri) == bool(request.dataset_path):
            raise InvalidArgument("embeddings_uri or dataset_path: give exactly one")
        config = simulation.SimulationConfig(
            label_column=request.label_column, obsm=tuple(request.obsm_keys), pca=request.pca_components,
            neighbours=request.neighbours, strategies=tuple(request.strategies),
            heads=tuple(request.heads) or ("mlp",), seeds=request.seeds or 5,
            test_fraction=request.test_fraction or 0.3, initial=request.initial or "per_class",
            initial_size=request.initial_size, query_size=request.query_size, rounds=request.rounds,
            budget=request.label_budget, schedule=tuple(request.schedule), metric=request.metric or "macro_f1",
            target=request.target or 0.95)
        config.validate()
        store = self.acquisition.store
        if request.embeddings_uri:
            try:
                data = read_anndata(store, request.embeddings_uri)
            except (ValueError, OSError) as exc:
                raise InvalidArgument(f"embeddings_uri: cannot read {request.embeddings_uri!r}: {exc}") from None
        else:
            data = request.dataset_path
        result = simulation.run_campaign(
            data, config, root=self.simulations_dir or Path(tempfile.mkdtemp(prefix="histoloop-sim-")),
            workers=1, resume=True, store=store, name=request.campaign, progress=False,
            max_total_rounds=simulation.RPC_MAX_ROUNDS)
        comparison = result.comparison or {}
        return acquisition_pb2.SimulateResponse(
            campaign_id=result.campaign_id, metric=comparison.get("metric", config.metric),
            target=comparison.get("target_share", config.target), pool_size=comparison.get("pool_size", 0),
            test_size=comparison.get("test_size", 0),
            full_supervision={h: _num(v["mean"]) for h, v in comparison.get("full_supervision", {}).items()},
            rows=[_simulation_row(r) for r in comparison.get("rows", [])],
            artifacts=result.uris, seconds=result.seconds)


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _simulation_row(row: dict) -> acquisition_pb2.SimulationRow:
    ltt, aulc, gain = row["labels_to_target"], row["aulc"], row["aulc_gain"] or {}
    return acquisition_pb2.SimulationRow(
        strategy=row["strategy"], head=row["head"], labels_to_target=_num(ltt["mean"]),
        labels_to_target_sd=_num(ltt["sd"]), fraction_to_target=_num(ltt["fraction_of_pool"]),
        seeds_reached=ltt["reached"], ratio_to_random=_num(row["ratio_to_random"]),
        ratio_bound={"≥": ">=", "≤": "<="}.get(row["ratio_bound"] or "", row["ratio_bound"] or ""),
        aulc=_num(aulc["mean"]), aulc_sd=_num(aulc["sd"]), aulc_gain=_num(gain.get("mean")),
        aulc_gain_p_wilcoxon=_num(gain.get("p_wilcoxon")), aulc_gain_p_ttest=_num(gain.get("p_ttest")),
        metric_at={k: _num(v["mean"]) for k, v in row["metric_at"].items()})


def build(runtime: Runtime) -> ServiceParts:
    """The acquisition service's parts."""
    acquisition = Acquisition(runtime.store, runtime.bus)
    servicer = AcquisitionServicer(acquisition, simulations_dir=runtime.settings.data_dir / "simulations")
    return ServiceParts(
        name="acquisition",
        grpc_service="histoloop.v1.AcquisitionService",
        register=lambda server: acquisition_pb2_grpc.add_AcquisitionServiceServicer_to_server(servicer, server),
        handlers={events.EMBEDDINGS_READY: acquisition.on_embeddings,
                  events.PREDICTIONS_READY: acquisition.on_predictions},
        coalesce=[events.PREDICTIONS_READY],
    )
