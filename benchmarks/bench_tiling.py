"""Patch extraction speed: OpenSlide vs direct JPEG decoding, on the same spot sets.

For each slide, several hexagonal Visium-like spot grids (100 µm pitch, 55 µm spots,
random sub-pitch offsets, seeded) are read in the storage order the tiling service uses
(bands of tile height, left to right). Each grid is read by a fresh reader of each
backend (cold caches), one process. Reported: region reads/s (decode + crop only) and
patches/s (read + batched resize to 224 px, what tiling does per spot), best of ``--repeat``,
plus the check that both paths gave identical pixels. torch (the batched resize) is
limited to one thread, so every figure is for one core.

A second table gives the handcrafted morphology embedder's speed on the same patches.

    .venv/bin/python benchmarks/bench_tiling.py [--grids 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from histoloop.embedding import HandcraftedEmbedder
from histoloop.tiling import SlideReader
from histoloop.tiling._resize import resize_batch

DATA = Path(
    os.environ.get("HISTOLOOP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)
SLIDES = ["CMU-1-Small-Region.svs", "CMU-1-Small-Region_pyramid_generic.tiff"]


def spot_grids(width: int, height: int, mpp: float, n_grids: int, seed: int) -> list[np.ndarray]:
    """Top-left corners (level 0) of spot regions for ``n_grids`` offset hex grids."""
    rng = np.random.default_rng(seed)
    col_step, row_step = 50 / mpp, 100 * math.sqrt(3) / 2 / mpp
    side = round(55 / mpp)
    grids = []
    for _ in range(n_grids):
        ox, oy = rng.uniform(0, 2 * col_step), rng.uniform(0, row_step)
        pts = []
        for r in range(int((height - side - oy) // row_step) + 1):
            for c in range(r % 2, int((width - side - ox) // col_step) + 1, 2):
                pts.append((round(ox + c * col_step), round(oy + r * row_step)))
        xy = np.array(pts, dtype=np.int64)
        order = np.lexsort((xy[:, 0], xy[:, 1] // 256))
        grids.append(xy[order])
    return grids


def run(
    path: Path, backend: str, grids: list[np.ndarray], side: int, resize: bool
) -> tuple[float, list[np.ndarray]]:
    n, seconds, out = 0, 0.0, []
    for xy in grids:
        with SlideReader(path, backend=backend, verify=False) as reader:  # type: ignore[arg-type]
            t0 = time.perf_counter()
            regions = np.empty((len(xy), side, side, 3), np.uint8)
            for i, (x, y) in enumerate(xy.tolist()):
                regions[i] = reader.read(0, x, y, side, side)
            if resize:  # as tiling does it: one batch per chunk
                regions = resize_batch(regions, 224)
            seconds += time.perf_counter() - t0
            out.extend(regions)
            n += len(xy)
    return n / seconds, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grids", type=int, default=8)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small run that checks the script works (make bench; not a measurement)",
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.grids, args.repeat = 1, 1
    torch.set_num_threads(1)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}; one process"
    )
    print(
        f"{'slide':42s} {'what':14s} {'n':>6s} {'openslide/s':>12s} {'direct/s':>10s} {'ratio':>6s} equal"
    )
    for name in SLIDES:
        path = DATA / "wsi" / name
        with SlideReader(path) as reader:
            assert reader.direct_levels, f"{name}: no direct level"
            mpp, (w, h) = reader.mpp, reader.dimensions
        assert mpp is not None
        grids = spot_grids(w, h, mpp, args.grids, seed=0)
        side = round(55 / mpp)
        n = sum(len(g) for g in grids)
        for what, resize in (("region read", False), ("patch (224px)", True)):
            best = {"openslide": 0.0, "auto": 0.0}
            results = {}
            for _ in range(args.repeat):
                for backend in best:
                    rate, res = run(path, backend, grids, side, resize)
                    best[backend] = max(best[backend], rate)
                    results[backend] = res
            equal = all(
                np.array_equal(a, b)
                for a, b in zip(results["openslide"], results["auto"], strict=True)
            )
            print(
                f"{name:42s} {what:14s} {n:6d} {best['openslide']:12.0f} {best['auto']:10.0f} "
                f"{best['auto'] / best['openslide']:6.2f} {equal}"
            )
            if resize:
                patches = np.stack(results["auto"])
    embedder = HandcraftedEmbedder()
    embedder.embed(patches[:8])
    rates = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        embedder.embed(patches)
        rates.append(len(patches) / (time.perf_counter() - t0))
    print(
        f"\nhandcrafted morphology features ({embedder.dim}-d) on {len(patches)} patches of "
        f"224 px: {max(rates):.0f} patches/s (best of {args.repeat}, one core)"
    )


if __name__ == "__main__":
    main()
