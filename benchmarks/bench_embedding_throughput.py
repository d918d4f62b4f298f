"""EfficientNet-Lite0 throughput: in-process torch vs in-process ONNX vs through Triton, same run.

    .venv/bin/python benchmarks/bench_embedding_throughput.py --patches 256 --repeat 3
    .venv/bin/python benchmarks/bench_embedding_throughput.py --quick   # checks the script works

``--quick``: 16 patches, one pass, 2 Triton clients, 1 thread: every path runs (the server
too), but the figures are not a measurement.

The same real H&E patches (her2st A1 spots, 224 px, tiled from the plain PNG) go through:

- in process, eager torch: ``EfficientNetEmbedder(runtime="torch")``;
- in process, ONNX Runtime: ``EfficientNetEmbedder()`` (the embedded default: the network is
  exported in memory at start and run by onnxruntime);
- ``triton``: :class:`histoloop.embedding.TritonEmbedder` against a real ``tritonserver``
  (pytriton's bundled build, CPU; the model runs with onnxruntime in pytriton's Python
  backend, dynamic batching from ``config.pbtxt``), one client and ``--clients`` clients.

Each figure is the best of ``--repeat`` passes over every patch (warm: one pass first).
Memory: the peak resident set (``ru_maxrss``, cumulative) of this process after each
in-process path; for Triton, the resident set of the server processes (tritonserver and its
Python backend stubs, from /proc) right after the measurement. A GPU figure
needs a device; when none is lent the note says so and nothing is made up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("HISTOLOOP_SHARED_DATA", REPO.parent / "shared" / "data"))


def _patches(n: int) -> np.ndarray:
    from her2st_a1 import a1_patches

    return a1_patches(SHARED / "her2st" / "A1", n)


def _best(fn, patches: np.ndarray, repeat: int) -> float:
    fn(patches[:32])  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(patches)
        best = min(best, time.perf_counter() - t0)
    return len(patches) / best


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tree_rss_mb(pid: int) -> float:
    """Resident MB of ``pid``'s descendants (the tritonserver and its Python backend stubs)."""
    total = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().split()
            if int(stat[3]) == pid or _is_descendant(int(proc.name), pid):
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total / 1024


def _is_descendant(pid: int, ancestor: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().split()[3])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
        seen += 1
    return False


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print a Markdown table (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4, help="concurrent Triton clients")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch / onnxruntime intra-op threads"
    )
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.patches, args.repeat, args.clients, args.threads = 16, 1, 2, 1

    import importlib.util

    from histoloop.embedding import EfficientNetEmbedder, TritonEmbedder, efficientnet_features
    from tests.fixtures.triton import onnx_model_spec, serve_models

    spec = importlib.util.spec_from_file_location(
        "export_model", REPO / "tools" / "export_model.py"
    )
    assert spec is not None and spec.loader is not None
    export_model = importlib.util.module_from_spec(spec)
    sys.modules["export_model"] = export_model  # dataclasses look their module up
    spec.loader.exec_module(export_model)

    patches = _patches(args.patches)
    rows: dict[str, dict[str, float]] = {}
    eager = EfficientNetEmbedder(batch_size=32, threads=args.threads, runtime="torch")
    rows["in-process, eager torch (runtime='torch')"] = {
        "patches_per_s": _best(eager.embed, patches, args.repeat),
        "peak_rss_mb": _rss_mb(),
    }
    default = EfficientNetEmbedder(batch_size=32, threads=args.threads)
    rows["in-process, ONNX Runtime (the default)"] = {
        "patches_per_s": _best(default.embed, patches, args.repeat),
        "peak_rss_mb": _rss_mb(),
    }
    reference = eager.embed(patches[:16])
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        export_model.export_module(
            efficientnet_features(),
            tmp,
            "efficientnet-lite0",
            max_batch_size=32,
            instance_kind="KIND_CPU",
            expected_dim=1280,
        )
        onnx_path = Path(tmp) / "efficientnet-lite0" / "1" / "model.onnx"
        with serve_models([onnx_model_spec("efficientnet-lite0", onnx_path)]) as server:
            with TritonEmbedder(server.grpc_url, "efficientnet-lite0") as remote:
                diff = float(np.abs(remote.embed(patches[:16]) - reference).max())
                rows["Triton, 1 client"] = {
                    "patches_per_s": _best(remote.embed, patches, args.repeat),
                    "server_rss_mb": _tree_rss_mb(os.getpid()),
                }

                def concurrent(batch: np.ndarray) -> None:
                    parts = np.array_split(batch, args.clients)
                    threads = [threading.Thread(target=remote.embed, args=(p,)) for p in parts]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()

                rows[f"Triton, {args.clients} clients"] = {
                    "patches_per_s": _best(concurrent, patches, args.repeat),
                    "server_rss_mb": _tree_rss_mb(os.getpid()),
                }
    base = rows["in-process, ONNX Runtime (the default)"]["patches_per_s"]
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{len(patches)} A1 patches (224 px), best of {args.repeat}; {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, load average {load}; max |Triton − torch| = {diff:.2e}\n"
    )
    print("| path | patches/s | × in-process default | memory (MB) |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        mem = row.get("peak_rss_mb") or row.get("server_rss_mb") or 0
        print(
            f"| {name} | {row['patches_per_s']:.1f} | {row['patches_per_s'] / base:.2f} | {mem:.0f} |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "max_abs_diff": diff, "load": load}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
