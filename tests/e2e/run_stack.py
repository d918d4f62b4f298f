"""Run the distributed stack on this machine, without Docker — the processes the e2e tests start.

``up``: the mock Kafka broker, moto S3, a fresh PostgreSQL database, Triton (pytriton, CPU)
and the six ``histoloop run <service>`` processes (mutual TLS and tokens unless ``--no-tls``);
prints every address, token and log file, optionally drives ``--rounds`` rounds of the loop
over gRPC, then stays up until Ctrl-C and stops everything.

``triton``: only the Triton server with the e2e model (for starting the rest by hand, as in
``tests/e2e/README.md``); prints its gRPC address and serves until Ctrl-C.

    .venv/bin/python tests/e2e/run_stack.py up --rounds 3
    .venv/bin/python tests/e2e/run_stack.py triton --model-repo /tmp/histoloop-models
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.e2e.loop import ProjectLoop  # noqa: E402
from tests.e2e.stack import TRITON_MODEL, export_triton_model, start_stack  # noqa: E402
from tests.fixtures.triton import onnx_model_spec, serve_models  # noqa: E402
from tests.tiling.visium_fake import make_visium  # noqa: E402


def _wait_for_ctrl_c() -> None:
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()


def _shared() -> Path:
    return Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))


def up(args: argparse.Namespace) -> int:
    root = Path(args.root or tempfile.mkdtemp(prefix="histoloop-stack-"))
    slide = _shared() / "wsi" / "CMU-1-Small-Region.svs"
    started = time.monotonic()
    with start_stack(root / "stack", tls=not args.no_tls, mutual_tls=not args.no_tls) as stack:
        print(
            f"stack ready in {time.monotonic() - started:.0f}s; state and logs under {root}/stack"
        )
        print(
            f"  kafka (librdkafka mock)  {stack.kafka.bootstrap}   topic prefix {stack.topic_prefix}"
        )
        print(f"  s3 (moto)                {stack.s3.endpoint}   bucket {stack.bucket}")
        print(f"  postgresql               database {stack.database}")
        print(f"  triton                   {stack.triton.grpc_url}   model {TRITON_MODEL}")
        for name, proc in stack.services.items():
            print(
                f"  {name:<24} 127.0.0.1:{proc.port}   metrics :{proc.metrics_port}   log {proc.log_path}"
            )
        print(f"  admin token              {stack.admin_token}")
        if stack.tls is not None:
            print(f"  TLS: CA {stack.tls.ca}, client cert {stack.tls.cert}, key {stack.tls.key}")
        if args.rounds:
            visium = make_visium(slide, root / "visium")
            loop = ProjectLoop(stack, visium, slide, project_id="demo")
            query_set = loop.start()
            print(f"cold-start query set: {len(query_set.spots)} spots")
            for round_ in range(1, args.rounds + 1):
                t = time.monotonic()
                loop.answer(query_set)
                query_set = loop.next_query_set(round_ - 1)
                print(
                    f"round {round_}: labels → model {query_set.model_version} → next query set "
                    f"in {time.monotonic() - t:.1f}s"
                )
            loop.close()
        print("up; Ctrl-C stops everything")
        _wait_for_ctrl_c()
    return 0


def triton(args: argparse.Namespace) -> int:
    repo = Path(args.model_repo)
    onnx_file = export_triton_model(repo)
    with serve_models([onnx_model_spec(TRITON_MODEL, onnx_file)]) as server:
        print(
            f"Triton gRPC at {server.grpc_url}, model {TRITON_MODEL} (export in {repo})", flush=True
        )
        _wait_for_ctrl_c()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="everything, as the e2e tests start it")
    p_up.add_argument("--root", help="folder for logs and state (default: a new temporary folder)")
    p_up.add_argument(
        "--no-tls", action="store_true", help="plaintext gRPC (tokens still required)"
    )
    p_up.add_argument(
        "--rounds", type=int, default=0, help="drive this many rounds of the loop first"
    )
    p_up.set_defaults(func=up)
    p_tr = sub.add_parser("triton", help="only Triton serving the e2e model")
    p_tr.add_argument(
        "--model-repo", default=str(Path(tempfile.gettempdir()) / "histoloop-e2e-models")
    )
    p_tr.set_defaults(func=triton)
    args = parser.parse_args()
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
