"""Simulation jobs over a real gRPC server (start, progress, cancel), and ``histoloop simulate``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from histoloop.cli import main
from histoloop.config import load_settings
from histoloop.datasets import write_anndata
from histoloop.server import Server
from histoloop.v1 import common_pb2, simulation_pb2, simulation_pb2_grpc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(
        load_settings(data_dir=tmp_path_factory.mktemp("serve"), grpc_port=0, metrics_port=0),
        ["simulation"],
    )
    srv.start()
    yield srv
    srv.stop(2)


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[simulation_pb2_grpc.SimulationServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield simulation_pb2_grpc.SimulationServiceStub(channel)


def _request(**kw) -> simulation_pb2.SimulateRequest:
    base = dict(
        label_column="layer",
        pca_components=10,
        neighbours=6,
        heads=["logreg"],
        strategies=["random", "entropy"],
        seeds=2,
        query_size=20,
        rounds=3,
    )
    base.update(kw)
    return simulation_pb2.SimulateRequest(**base)


FINISHED = (
    simulation_pb2.SIMULATION_STATE_SUCCEEDED,
    simulation_pb2.SIMULATION_STATE_FAILED,
    simulation_pb2.SIMULATION_STATE_CANCELLED,
)


def _wait(stub, job_id: str, timeout: float = 120) -> simulation_pb2.SimulationJob:
    """Poll GetSimulation until the job has finished; the progress never goes back."""
    deadline, done = time.monotonic() + timeout, 0
    while True:
        job = stub.GetSimulation(simulation_pb2.GetSimulationRequest(job_id=job_id), timeout=10)
        assert job.rounds_done >= done
        done = job.rounds_done
        if job.state in FINISHED:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job.state} after {timeout}s"
        time.sleep(0.05)


def _simulate(stub, request: simulation_pb2.SimulateRequest) -> simulation_pb2.SimulateResponse:
    started = stub.StartSimulation(
        request, timeout=10
    )  # returns at once: the campaign runs off the RPC thread
    job = _wait(stub, started.job_id)
    assert job.state == simulation_pb2.SIMULATION_STATE_SUCCEEDED, job.error
    assert job.rounds_done == job.rounds_total > 0
    return job.result


def test_simulate_rpc_on_a_server_local_file(stub, server: Server, small_h5ad: Path) -> None:
    reply = _simulate(stub, _request(dataset_path=str(small_h5ad)))
    assert reply.campaign_id.startswith("sim-")
    assert reply.metric == "macro_f1" and reply.target == pytest.approx(0.95)
    assert {(r.head, r.strategy) for r in reply.rows} == {
        ("logreg", "random"),
        ("logreg", "entropy"),
    }
    assert 0.0 < reply.full_supervision["logreg"] <= 1.0
    entropy = next(r for r in reply.rows if r.strategy == "entropy")
    assert 0.0 < entropy.aulc <= 1.0 and set(entropy.metric_at) == {
        "0.1",
        "0.3",
        "0.5",
        "0.7",
        "0.9",
    }
    assert math.isnan(entropy.metric_at["0.9"])  # beyond the 3 rounds
    store = server.runtime.store
    for name in (
        "learning_curves.png",
        "efficiency.png",
        "comparison.json",
        "comparison.md",
        "comparison.tex",
        "rounds.jsonl",
    ):
        assert store.get(store.key_from_uri(reply.artifacts[name])), name
    assert store.get(store.key_from_uri(reply.artifacts["learning_curves.png"]))[:8] == PNG_MAGIC
    again = _simulate(stub, _request(dataset_path=str(small_h5ad)))  # the same job: nothing to run
    assert again.campaign_id == reply.campaign_id
    assert [r.aulc for r in again.rows] == [r.aulc for r in reply.rows]


def test_simulate_rpc_on_an_embeddings_artifact(stub, server: Server, small_adata) -> None:
    adata = small_adata.copy()
    from histoloop.training.scaling import log1p_normalise

    adata.obsm["X_expr"] = log1p_normalise(adata.X)[:, :50]
    uri = write_anndata(server.runtime.store, "embeddings/sim-test/small/e1.h5ad", adata)
    reply = _simulate(
        stub,
        _request(
            embeddings_uri=uri,
            obsm_keys=["X_expr"],
            pca_components=0,
            neighbours=0,
            strategies=["margin"],
            rounds=2,
            campaign="named-campaign",
        ),
    )
    assert reply.campaign_id == "named-campaign"
    assert [r.strategy for r in reply.rows] == ["margin"]
    assert math.isnan(reply.rows[0].ratio_to_random)  # no random arm to compare with


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"label_column": ""}, "label_column"),
        ({"strategies": ["nope"]}, "strategies"),
        ({"schedule": [0.5, 0.1]}, "schedule"),
        ({"dataset_path": ""}, "dataset_path"),
        ({"dataset_path": "/nowhere/x.h5ad"}, "dataset_path"),
        ({"embeddings_uri": "file:///x"}, "embeddings_uri"),
    ],
)
def test_start_rejects_bad_requests_at_once(
    stub, small_h5ad: Path, change: dict, field: str
) -> None:
    request = _request(dataset_path=str(small_h5ad))
    for key, value in change.items():
        if isinstance(value, list):
            del getattr(request, key)[:]
            getattr(request, key).extend(value)
        else:
            setattr(request, key, value)
    with pytest.raises(grpc.RpcError) as err:
        stub.StartSimulation(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()


def test_start_rejects_loop_settings_a_campaign_cannot_take(stub, small_h5ad: Path) -> None:
    request = _request(dataset_path=str(small_h5ad))
    request.loop.CopyFrom(common_pb2.LoopConfig(hybrid_share=0.5, query_size=7))
    with pytest.raises(grpc.RpcError) as err:
        stub.StartSimulation(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "loop: query_size cannot be set here" in err.value.details()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"label_column": "nope"}, "label_column"),
        ({"obsm_keys": ["X_nope"]}, "obsm"),
        ({"seeds": 200, "rounds": 100}, "rounds"),  # too big for a server job
    ],
)
def test_a_job_fails_on_what_only_the_data_tell(
    stub, small_h5ad: Path, change: dict, field: str
) -> None:
    request = _request(dataset_path=str(small_h5ad), **change)
    job = _wait(stub, stub.StartSimulation(request, timeout=10).job_id, timeout=60)
    assert job.state == simulation_pb2.SIMULATION_STATE_FAILED
    assert job.error_code == "INVALID_ARGUMENT" and field in job.error
    assert not job.HasField("result")


def test_cancel_stops_a_running_job_and_start_resumes_it(stub, small_h5ad: Path) -> None:
    request = _request(
        dataset_path=str(small_h5ad), strategies=["random"], rounds=12, campaign="to-cancel"
    )
    job_id = stub.StartSimulation(request, timeout=10).job_id
    assert job_id == "to-cancel"
    deadline = time.monotonic() + 60
    while stub.GetSimulation(simulation_pb2.GetSimulationRequest(job_id=job_id)).rounds_done < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stub.CancelSimulation(simulation_pb2.CancelSimulationRequest(job_id=job_id))
    cancelled = _wait(stub, job_id)
    assert cancelled.state == simulation_pb2.SIMULATION_STATE_CANCELLED
    assert 1 <= cancelled.rounds_done < cancelled.rounds_total
    resumed = _wait(stub, stub.StartSimulation(request, timeout=10).job_id)
    assert resumed.state == simulation_pb2.SIMULATION_STATE_SUCCEEDED
    assert resumed.rounds_done == resumed.rounds_total and resumed.result.campaign_id == "to-cancel"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetSimulation(simulation_pb2.GetSimulationRequest(job_id="no-such-job"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_cli_simulate(small_h5ad: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = [
        "simulate",
        "--data",
        str(small_h5ad),
        "--label-column",
        "layer",
        "--pca",
        "10",
        "--strategies",
        "random,least_confidence",
        "--seeds",
        "2",
        "--head",
        "logreg",
        "--query-size",
        "20",
        "--budget",
        "60",
        "--schedule",
        "0.5",
        "--neighbours",
        "6",
        "--out",
        str(out),
        "--workers",
        "1",
        "--loop",
        '{"stop_patience": 1}',
    ]
    assert main(args) == 0
    assert json.loads((out / "campaign.json").read_text())["config"]["loop"] == {"stop_patience": 1}
    printed = capsys.readouterr().out
    assert "least_confidence" in printed and "full supervision" in printed
    for name in (
        "learning_curves.png",
        "efficiency.png",
        "comparison.md",
        "comparison.tex",
        "comparison.json",
    ):
        assert (out / name).stat().st_size > 0
    assert main(args) == 2  # the folder holds a campaign: --resume or another folder
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        (["--strategies", "entropy,nope"], "strategies"),
        (["--label-column", "nope"], "label_column"),
        (["--obsm", "X_nope"], "obsm"),
        (["--schedule", "0.9:0.1:0.1"], "schedule"),
        (["--head", "forest"], "heads"),
        (["--loop", "hybrid_share=0.5"], "--loop: not JSON"),
        (["--loop", '{"strategy": "margin"}'], "loop: strategy cannot be set here"),
    ],
)
def test_cli_rejects_bad_arguments(
    small_h5ad: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    field: str,
) -> None:
    out = tmp_path / "never"
    code = main(
        [
            "simulate",
            "--data",
            str(small_h5ad),
            "--out",
            str(out),
            "--head",
            "logreg",
            "--seeds",
            "1",
            "--rounds",
            "1",
            "--label-column",
            "layer",
            *extra,
        ]
    )
    assert code == 2
    assert field in capsys.readouterr().err
    assert not out.exists()
