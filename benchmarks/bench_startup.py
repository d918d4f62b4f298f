"""How long ``histoloop serve`` (all six services) takes to answer SERVING, vs one service.

Starts each command as a fresh process N times, polls the gRPC health service every 20 ms
and reports the median seconds from process start to SERVING for every service.

Usage: ``.venv/bin/python benchmarks/bench_startup.py [--runs 5]``
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ALL = [
    "AnnotationStoreService",
    "TilingService",
    "EmbeddingService",
    "TrainingService",
    "PredictionService",
    "AcquisitionService",
    "SimulationService",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_to_serving(args: list[str], services: list[str]) -> float:
    port = _free_port()
    env = {
        **os.environ,
        "HISTOLOOP_DATA_DIR": tempfile.mkdtemp(),
        "HISTOLOOP_GRPC_PORT": str(port),
        "HISTOLOOP_METRICS_PORT": "0",
    }
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "histoloop.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            pending = set(services)
            while pending:
                for name in list(pending):
                    try:
                        reply = stub.Check(
                            health_pb2.HealthCheckRequest(service=f"histoloop.v1.{name}"), timeout=1
                        )
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            pending.discard(name)
                    except grpc.RpcError:
                        pass
                time.sleep(0.02)
        return time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args()
    if args.quick:
        args.runs = 1
    serve = [time_to_serving(["serve"], ALL) for _ in range(args.runs)]
    one = [
        time_to_serving(["run", "acquisition"], ["AcquisitionService"]) for _ in range(args.runs)
    ]
    print(
        f"histoloop serve ({len(ALL)} services): median {statistics.median(serve):.2f}s, max {max(serve):.2f}s"
    )
    print(
        f"histoloop run acquisition:    median {statistics.median(one):.2f}s, max {max(one):.2f}s"
    )
    print(f"ratio serve / one service: {statistics.median(serve) / statistics.median(one):.2f}")


if __name__ == "__main__":
    main()
