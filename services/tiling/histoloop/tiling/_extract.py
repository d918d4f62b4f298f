"""Patch extraction, in-process or over a pool of worker processes.

Every patch of one run has the same level and region side; a chunk is a list of region
origins (level pixels). Workers open their own slide reader (:func:`open_slide`) once (pool
initializer) and return the chunk's patches as one uint8 array; the parent process
writes each chunk to the artifact store as it arrives and reports progress.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoloop.errors import InvalidArgument
from histoloop.tiling._resize import resize_batch
from histoloop.tiling._slide import Backend, BaseSlide, open_slide

__all__ = ["ChunkPlan", "ProgressCallback", "default_workers", "extract_chunk", "run_extraction"]

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``on_progress(done, total)``: patches extracted so far and in all."""

_WORKER_READER: BaseSlide | None = None


def default_workers() -> int:
    """``min(2, cpu count)``."""
    return max(1, min(2, os.cpu_count() or 1))


@dataclass(frozen=True)
class ChunkPlan:
    """What one chunk reads: ``level``, region ``side`` and origins, output ``patch_size``."""

    chunk: int
    level: int
    side: int
    patch_size: int
    xs: np.ndarray
    ys: np.ndarray


def extract_chunk(reader: BaseSlide, plan: ChunkPlan) -> np.ndarray:
    """Read and resize every region of a chunk → uint8 (n, patch_size, patch_size, 3)."""
    regions = np.empty((len(plan.xs), plan.side, plan.side, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(zip(plan.xs.tolist(), plan.ys.tolist(), strict=True)):
        regions[i] = reader.read(plan.level, x, y, plan.side, plan.side)
    return resize_batch(regions, plan.patch_size)


def _init_worker(path: str, backend: Backend, cache_tiles: int) -> None:
    global _WORKER_READER
    import torch

    torch.set_num_threads(1)  # one core per worker process
    _WORKER_READER = open_slide(path, backend=backend, cache_tiles=cache_tiles)


def _work(plan: ChunkPlan) -> tuple[int, np.ndarray]:
    assert _WORKER_READER is not None, "worker not initialised"
    return plan.chunk, extract_chunk(_WORKER_READER, plan)


def run_extraction(
    reader: BaseSlide,
    plans: list[ChunkPlan],
    on_chunk: Callable[[int, np.ndarray], None],
    *,
    workers: int,
    backend: Backend,
    cache_tiles: int,
    on_progress: ProgressCallback | None = None,
    mp_context: str = "spawn",
) -> None:
    """Extract every chunk and hand each to ``on_chunk(chunk, patches)`` in the parent.

    Chunks may complete out of order. With ``workers == 1`` (or a single chunk) the
    already open ``reader`` is used in this process; otherwise a process pool with at
    most ``2 × workers`` chunks in flight. ``mp_context`` is ``spawn`` by default
    because the caller may be a threaded server, where ``fork`` is unsafe.

    Raises:
        InvalidArgument: ``workers`` < 1.
        SlideUnreadable: a region cannot be decoded (raised from the worker).
    """
    if workers < 1:
        raise InvalidArgument(f"workers must be ≥ 1, got {workers}")
    total = sum(len(p.xs) for p in plans)
    done = 0
    if on_progress is not None:
        on_progress(0, total)
    if workers == 1 or len(plans) <= 1:
        for plan in plans:
            on_chunk(plan.chunk, extract_chunk(reader, plan))
            done += len(plan.xs)
            if on_progress is not None:
                on_progress(done, total)
        return
    ctx = multiprocessing.get_context(mp_context)
    pending: set[Future[tuple[int, np.ndarray]]] = set()
    sizes = {p.chunk: len(p.xs) for p in plans}
    with ProcessPoolExecutor(
        max_workers=min(workers, len(plans)),
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(str(Path(reader.path)), backend, cache_tiles),
    ) as pool:
        try:
            for plan in plans:
                pending.add(pool.submit(_work, plan))
                if len(pending) >= 2 * workers:
                    done = _drain(pending, on_chunk, sizes, done, total, on_progress)
            while pending:
                done = _drain(pending, on_chunk, sizes, done, total, on_progress)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _drain(
    pending: set[Future[tuple[int, np.ndarray]]],
    on_chunk: Callable[[int, np.ndarray], None],
    sizes: dict[int, int],
    done: int,
    total: int,
    on_progress: ProgressCallback | None,
) -> int:
    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
    for fut in finished:
        pending.discard(fut)
        chunk, patches = fut.result()
        on_chunk(chunk, patches)
        done += sizes[chunk]
        if on_progress is not None:
            on_progress(done, total)
    return done
