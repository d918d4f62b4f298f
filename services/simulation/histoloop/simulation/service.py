"""Wiring of the simulation service: the job servicer and its background runner."""

from __future__ import annotations

import math
from typing import cast

import grpc
from google.protobuf import json_format

from histoloop.runtime import Runtime, ServiceParts
from histoloop.simulation.campaign import Metric, SimulationConfig
from histoloop.simulation.jobs import JobStatus, SimulationJobs, SimulationSpec
from histoloop.v1 import simulation_pb2, simulation_pb2_grpc

__all__ = ["SimulationServicer", "build", "spec_from_request"]

_STATES = {
    "queued": simulation_pb2.SIMULATION_STATE_QUEUED,
    "running": simulation_pb2.SIMULATION_STATE_RUNNING,
    "succeeded": simulation_pb2.SIMULATION_STATE_SUCCEEDED,
    "failed": simulation_pb2.SIMULATION_STATE_FAILED,
    "cancelled": simulation_pb2.SIMULATION_STATE_CANCELLED,
}


def spec_from_request(request: simulation_pb2.SimulateRequest) -> SimulationSpec:
    """The domain spec of a ``SimulateRequest`` (proto defaults → the campaign's defaults)."""
    config = SimulationConfig(
        label_column=request.label_column,
        obsm=tuple(request.obsm_keys),
        pca=request.pca_components,
        neighbours=request.neighbours,
        strategies=tuple(request.strategies),
        heads=tuple(request.heads) or ("mlp",),
        seeds=request.seeds or 5,
        test_fraction=request.test_fraction or 0.3,
        initial=request.initial or "per_class",
        initial_size=request.initial_size,
        query_size=request.query_size,
        rounds=request.rounds,
        budget=request.label_budget,
        schedule=tuple(request.schedule),
        metric=cast(Metric, request.metric or "macro_f1"),  # SimulationConfig checks it
        target=request.target or 0.95,
        raters=tuple(request.raters),
        loop=json_format.MessageToDict(request.loop, preserving_proto_field_name=True),
    )
    return SimulationSpec(
        config=config,
        embeddings_uri=request.embeddings_uri,
        dataset_path=request.dataset_path,
        name=request.campaign,
    )


class SimulationServicer(simulation_pb2_grpc.SimulationServiceServicer):
    """Thin proto ↔ domain layer over :class:`SimulationJobs`."""

    def __init__(self, jobs: SimulationJobs) -> None:
        self.jobs = jobs

    def StartSimulation(
        self, request: simulation_pb2.SimulateRequest, context: grpc.ServicerContext
    ) -> simulation_pb2.SimulationJob:
        return _job_proto(self.jobs.start_job(spec_from_request(request)))

    def GetSimulation(
        self, request: simulation_pb2.GetSimulationRequest, context: grpc.ServicerContext
    ) -> simulation_pb2.SimulationJob:
        return _job_proto(self.jobs.get(request.job_id))

    def CancelSimulation(
        self, request: simulation_pb2.CancelSimulationRequest, context: grpc.ServicerContext
    ) -> simulation_pb2.SimulationJob:
        return _job_proto(self.jobs.cancel(request.job_id))


def _job_proto(status: JobStatus) -> simulation_pb2.SimulationJob:
    job = simulation_pb2.SimulationJob(
        job_id=status.job_id,
        state=_STATES[status.state],
        rounds_done=status.rounds_done,
        rounds_total=status.rounds_total,
        error=status.error,
        error_code=status.error_code,
        seconds=status.seconds,
    )
    result = status.result
    if result is not None and result.complete:
        comparison = result.comparison or {}
        job.result.CopyFrom(
            simulation_pb2.SimulateResponse(
                campaign_id=result.campaign_id,
                metric=comparison.get("metric", ""),
                target=comparison.get("target_share", 0.0),
                pool_size=comparison.get("pool_size", 0),
                test_size=comparison.get("test_size", 0),
                full_supervision={
                    h: _num(v["mean"]) for h, v in comparison.get("full_supervision", {}).items()
                },
                rows=[_simulation_row(r) for r in comparison.get("rows", [])],
                artifacts=result.uris,
                seconds=result.seconds,
            )
        )
    return job


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _simulation_row(row: dict) -> simulation_pb2.SimulationRow:
    ltt, aulc, gain = row["labels_to_target"], row["aulc"], row["aulc_gain"] or {}
    return simulation_pb2.SimulationRow(
        strategy=row["strategy"],
        head=row["head"],
        labels_to_target=_num(ltt["mean"]),
        labels_to_target_sd=_num(ltt["sd"]),
        fraction_to_target=_num(ltt["fraction_of_pool"]),
        seeds_reached=ltt["reached"],
        ratio_to_random=_num(row["ratio_to_random"]),
        ratio_bound={"≥": ">=", "≤": "<="}.get(row["ratio_bound"] or "", row["ratio_bound"] or ""),
        aulc=_num(aulc["mean"]),
        aulc_sd=_num(aulc["sd"]),
        aulc_gain=_num(gain.get("mean")),
        aulc_gain_p_wilcoxon=_num(gain.get("p_wilcoxon")),
        aulc_gain_p_ttest=_num(gain.get("p_ttest")),
        metric_at={k: _num(v["mean"]) for k, v in row["metric_at"].items()},
    )


def build(runtime: Runtime) -> ServiceParts:
    """The simulation service's parts: the servicer and the job runner."""
    jobs = SimulationJobs(runtime.store, runtime.settings.data_dir / "simulations")
    servicer = SimulationServicer(jobs)
    return ServiceParts(
        name="simulation",
        grpc_service="histoloop.v1.SimulationService",
        register=lambda server: simulation_pb2_grpc.add_SimulationServiceServicer_to_server(
            servicer, server
        ),
        background=[jobs],
    )
