"""Sustained SubmitLabels over gRPC: N concurrent annotators against one annotation store.

Starts ``histoloop run annotation_store`` as a separate process (auth on, one bearer token
per annotator) on a fresh database — PostgreSQL (a new database on the given server) or
SQLite — registers the real DLPFC 151510 spots, then runs ``--clients`` threads, each
submitting batches of ``--batch-size`` labels (random in-tissue spots, random layer) with
unique batch ids for ``--duration`` seconds. Two load modes:

``--mode paced`` (default)
    open loop: together the clients offer ``--labels-per-s`` (each client sends on a fixed
    schedule); latency is measured from each call's *scheduled* time, so a slow server
    cannot hide queueing by slowing the clients down (no coordinated omission).
``--mode max``
    closed loop: each client sends its next batch as soon as the previous one returns —
    the server's capacity; latency then is mostly time spent queueing.

Reports labels/s, latency percentiles, and
checks in the database that every acknowledged label is stored exactly once (plus a
resubmission of acknowledged batches that must come back ``duplicate``). Afterwards it
waits for the outbox relay to publish one ``labels.committed`` per batch.

    python benchmarks/bench_submit_labels.py --backend postgres
    python benchmarks/bench_submit_labels.py --backend postgres --mode max
    python benchmarks/bench_submit_labels.py --backend sqlite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from histoloop.v1 import annotation_store_pb2 as pb
from histoloop.v1 import annotation_store_pb2_grpc as pb_grpc
from histoloop.v1 import common_pb2

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument(
        "--pg",
        default="host=127.0.0.1 port=5432 user=postgres dbname=postgres",
        help="libpq conninfo of a server where a database may be created",
    )
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument(
        "--batch-size", type=int, default=20, help="labels per SubmitLabels (a query set)"
    )
    parser.add_argument("--mode", choices=["paced", "max"], default="paced")
    parser.add_argument(
        "--labels-per-s", type=float, default=2000.0, help="offered load of --mode paced"
    )
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument(
        "--drain-timeout", type=float, default=300.0, help="seconds to wait for the relay"
    )
    parser.add_argument(
        "--data", default=str(REPO.parent / "shared" / "data" / "dlpfc" / "151510" / "spatial")
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and state folder")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args()
    if args.quick:
        args.clients, args.duration, args.warmup, args.drain_timeout = 2, 2.0, 0.5, 60.0

    state = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    params = dict(p.split("=", 1) for p in args.pg.split())
    pg_db = ""
    if args.backend == "postgres":
        pg_db = f"histoloop_bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {pg_db}")  # type: ignore[arg-type]
        url = (
            f"postgresql+psycopg://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
            f"{params.get('port', '5432')}/{pg_db}"
        )
    else:
        url = f"sqlite:///{state / 'store.sqlite'}"

    admin = "adm-" + secrets.token_hex(16)
    port = free_port()
    env = {
        **os.environ,
        "HISTOLOOP_DATA_DIR": str(state),
        "HISTOLOOP_DATABASE_URL": url,
        "HISTOLOOP_GRPC_PORT": str(port),
        "HISTOLOOP_METRICS_PORT": "0",
        "HISTOLOOP_AUTH": "token",
        "HISTOLOOP_ADMIN_TOKEN": admin,
        "HISTOLOOP_SERVICE_TOKEN": "svc-" + secrets.token_hex(16),
        "HISTOLOOP_LOG_LEVEL": "WARNING",
    }
    log = open(state / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "histoloop.cli", "run", "annotation_store"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, server)
        result = run(args, target, admin, url, pg_db, state)
        result.update(backend=args.backend, machine=machine())
        print(json.dumps(result, indent=2))
        return 0 if result["exactly_once"] else 1
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        if pg_db and not args.keep:
            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {pg_db} WITH (FORCE)")  # type: ignore[arg-type]
        if args.keep:
            print(f"state kept in {state}", file=sys.stderr)


def wait_serving(target: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"server exited with {server.returncode}")
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service="histoloop.v1.AnnotationStoreService"),
                    timeout=1,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise SystemExit("server did not become SERVING within 60 s")


def run(
    args: argparse.Namespace, target: str, admin: str, url: str, pg_db: str, state: Path
) -> dict[str, object]:
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.AnnotationStoreServiceStub(channel)
    md = [("authorization", f"Bearer {admin}")]
    project = f"bench-{uuid.uuid4().hex[:6]}"
    stub.CreateProject(
        pb.CreateProjectRequest(
            project_id=project,
            name="bench",
            classes=[common_pb2.ClassDef(name=c) for c in LAYERS],
            config=common_pb2.LoopConfig(features=common_pb2.FEATURE_SET_EXPRESSION),
        ),
        metadata=md,
    )
    stub.RegisterDataset(  # the door: an expression project needs the sample's counts
        pb.RegisterDatasetRequest(
            project_id=project,
            dataset_id="151510",
            spatial_dir=args.data,
            expression_path=str(Path(args.data).parent / "dlpfc151510_500genes.h5ad"),
        ),
        metadata=md,
    )
    barcodes = [
        line.split(",")[0]
        for line in Path(args.data, "tissue_positions_list.csv").read_text().splitlines()
        if line.split(",")[1] == "1"
    ]
    tokens = [
        stub.RegisterAnnotator(
            pb.RegisterAnnotatorRequest(annotator_id=f"path{i}", projects=[project]), metadata=md
        ).token
        for i in range(args.clients)
    ]

    start_at = time.monotonic() + 0.5
    measure_from = start_at + args.warmup
    stop_at = measure_from + args.duration
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    acked: list[list[tuple[str, int, pb.SubmitLabelsRequest]]] = [[] for _ in range(args.clients)]
    errors: list[str] = []

    interval = args.clients * args.batch_size / args.labels_per_s if args.mode == "paced" else 0.0

    def client(i: int) -> None:
        rng = random.Random(i)
        with grpc.insecure_channel(target) as ch:
            s = pb_grpc.AnnotationStoreServiceStub(ch)
            meta = [("authorization", f"Bearer {tokens[i]}")]
            n = 0
            first = start_at + interval * i / args.clients  # spread the clients' schedules
            time.sleep(max(0.0, first - time.monotonic()))
            while (now := time.monotonic()) < stop_at:
                scheduled = first + interval * n if interval else now
                if scheduled > now:
                    time.sleep(scheduled - now)
                    now = scheduled
                n += 1
                batch_id = f"c{i}-b{n}"
                spots = rng.sample(barcodes, args.batch_size)
                request = pb.SubmitLabelsRequest(
                    project_id=project,
                    dataset_id="151510",
                    batch_id=batch_id,
                    labels=[pb.SpotLabel(barcode=b, label=rng.choice(LAYERS)) for b in spots],
                )
                try:
                    reply = s.SubmitLabels(request, metadata=meta, timeout=30)
                except grpc.RpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                elapsed = time.monotonic() - scheduled
                acked[i].append((batch_id, reply.n_labels, request))
                if now >= measure_from:
                    latencies[i].append(elapsed)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    measured = [x for lst in latencies for x in lst]
    n_calls = len(measured)  # calls scheduled inside the measured window that succeeded
    labels_per_s = n_calls * args.batch_size / args.duration
    all_acked = [b for lst in acked for b in lst]
    expected_labels = sum(n for _b, n, _r in all_acked)

    # every acknowledged label stored exactly once; resending a batch (a client retry)
    # changes nothing (resending its id with other labels is refused: ALREADY_EXISTS)
    sample = random.Random(1).sample(all_acked, min(50, len(all_acked)))
    dup_ok = all(stub.SubmitLabels(request, metadata=md).duplicate for _b, _n, request in sample)
    stored = count_rows(url, pg_db, args, project)
    status = stub.GetStatus(pb.GetStatusRequest(project_id=project), metadata=md)

    # the relay: one labels.committed per batch (the benchmark does not wait for it inside the window)
    t0 = time.monotonic()
    pending = status.pending_events
    while pending and time.monotonic() - t0 < args.drain_timeout:
        time.sleep(1.0)
        pending = stub.GetStatus(
            pb.GetStatusRequest(project_id=project), metadata=md
        ).pending_events
    drain_s = time.monotonic() - t0
    with sqlite3.connect(state / "events.sqlite") as conn:
        n_events, n_distinct = conn.execute(
            "SELECT count(*), count(DISTINCT event_id) FROM events WHERE topic = 'labels.committed'"
        ).fetchone()
    channel.close()
    exactly_once = (
        stored["label_events"] == expected_labels
        and stored["batches"] == len(all_acked)
        and stored["duplicate_rows"] == 0
        and dup_ok
        and not errors
    )
    return {
        "mode": args.mode,
        "offered_labels_per_s": args.labels_per_s if args.mode == "paced" else None,
        "clients": args.clients,
        "batch_size": args.batch_size,
        "duration_s": args.duration,
        "calls": n_calls,
        "labels_per_s": round(labels_per_s, 1),
        "batches_per_s": round(n_calls / args.duration, 1),
        "latency_ms": {
            q: round(percentile(measured, float(q[1:])) * 1000, 1) for q in ("p50", "p95", "p99")
        }
        | {"max": round(max(measured) * 1000, 1)},
        "acknowledged_batches": len(all_acked),
        "acknowledged_labels": expected_labels,
        "stored": stored,
        "resubmitted_batches_duplicate": dup_ok,
        "errors": errors[:5],
        "n_errors": len(errors),
        "exactly_once": exactly_once,
        "outbox_pending_after_window": status.pending_events,
        "relay_drain_s": round(drain_s, 1) if not pending else f">{args.drain_timeout}",
        "labels_committed_events": {
            "records": n_events,
            "distinct_event_ids": n_distinct,
            "batches": len(all_acked),
        },
    }


def count_rows(url: str, pg_db: str, args: argparse.Namespace, project: str) -> dict[str, int]:
    queries = {
        "label_events": "SELECT count(*) FROM label_events WHERE project_id = %s",
        "batches": "SELECT count(*) FROM label_batches WHERE project_id = %s",
        "duplicate_rows": (
            "SELECT count(*) FROM (SELECT batch_pk, spot_id FROM label_events WHERE project_id = %s "
            "GROUP BY batch_pk, spot_id HAVING count(*) > 1) d"
        ),
    }
    if pg_db:
        conninfo = " ".join(
            f"{k}={v}"
            for k, v in {**dict(p.split("=", 1) for p in args.pg.split()), "dbname": pg_db}.items()
        )
        with psycopg.connect(conninfo) as conn:
            return {k: conn.execute(q, (project,)).fetchone()[0] for k, q in queries.items()}  # type: ignore[index]
    with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
        return {
            k: conn.execute(q.replace("%s", "?"), (project,)).fetchone()[0]
            for k, q in queries.items()
        }


def machine() -> str:
    cpus = os.cpu_count()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpus} CPUs ({model}), Python {platform.python_version()}"


if __name__ == "__main__":
    raise SystemExit(main())
