"""The two tiling entry points: Visium spots and plain WSI grid tiles."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from histoloop.artifacts import ArtifactExists, ArtifactStore, validate_key
from histoloop.errors import InvalidArgument
from histoloop.formats.patches import (
    MANIFEST_FORMAT,
    array_to_npy,
    chunk_key,
    index_key,
    manifest_key,
    overlay_key,
)
from histoloop.tiling._errors import PositionsOutsideSlide, ScaleMismatch
from histoloop.tiling._extract import (
    ChunkPlan,
    ProgressCallback,
    default_workers,
    run_extraction,
)
from histoloop.tiling._overlay import draw_overlay
from histoloop.tiling._slide import Backend, BaseSlide, open_slide
from histoloop.tiling._tissue import TissueMask, tissue_mask
from histoloop.tiling._visium import read_spatial

__all__ = ["NoTissueFound", "TilingResult", "tile_visium", "tile_wsi"]

log = logging.getLogger(__name__)

_NPY = "application/x-npy"


class NoTissueFound(InvalidArgument):
    """Grid tiling found no tile with enough tissue."""


@dataclass(frozen=True)
class TilingResult:
    """What a tiling run wrote.

    Attributes:
        kind: ``visium`` or ``wsi``.
        prefix: the key prefix everything was written under.
        manifest_key: the manifest (open the set with ``PatchSet.open(store, prefix)``).
        index_key: the index CSV.
        patch_keys: the chunk keys, in order.
        overlay_key: the debug overlay PNG.
        n_patches: patches written.
        patch_size: side of each patch, pixels.
        level: pyramid level read.
        downsample: that level's downsample.
        region_size: side of the region read, in level pixels (before resizing).
        direct: whether the level was read by direct JPEG decoding (else OpenSlide).
        seconds: wall time of the run.
        warnings: notes for the user (spots skipped, …).
    """

    kind: Literal["visium", "wsi"]
    prefix: str
    manifest_key: str
    index_key: str
    patch_keys: tuple[str, ...]
    overlay_key: str
    n_patches: int
    patch_size: int
    level: int
    downsample: float
    region_size: int
    direct: bool
    seconds: float
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def keys(self) -> list[str]:
        """Every artifact key written (chunks, index, overlay, manifest)."""
        return [*self.patch_keys, self.index_key, self.overlay_key, self.manifest_key]


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InvalidArgument(f"{name} must be a positive number, got {value!r}")


def _check_prefix(store: ArtifactStore, prefix: str) -> str:
    prefix = prefix.rstrip("/")
    validate_key(prefix)
    for info in store.list(prefix + "/"):
        raise ArtifactExists(
            f"artifact prefix {prefix!r} holds {info.key!r} already; artifacts are immutable, "
            "tile into a new prefix"
        )
    return prefix


def tile_visium(
    slide_path: str | Path,
    spatial_dir: str | Path,
    store: ArtifactStore,
    key_prefix: str,
    *,
    context: float = 1.0,
    patch_size: int = 224,
    scale: float = 1.0,
    offset: tuple[float, float] = (0.0, 0.0),
    include_off_tissue: bool = False,
    outside: Literal["error", "skip"] = "error",
    check_tissue: bool = True,
    chunk_size: int = 256,
    workers: int | None = None,
    backend: Backend = "auto",
    cache_tiles: int = 128,
    on_progress: ProgressCallback | None = None,
) -> TilingResult:
    """Extract one patch per Visium spot and store them as a patch set.

    Spot centres (Space Ranger full-res pixels) map to slide level-0 pixels as
    ``x = pxl_col_in_fullres × scale + offset[0]``, ``y = pxl_row_in_fullres × scale +
    offset[1]``. ``scale`` is 1 when the slide is the image Space Ranger was run on, 0.5
    when the slide has half its resolution, etc. A patch covers
    ``spot_diameter_fullres × scale × context`` level-0 pixels around the centre, read
    from the lowest-resolution level that still has enough pixels and resized to
    ``patch_size``.

    Args:
        slide_path: the slide (any format OpenSlide reads).
        spatial_dir: Space Ranger ``spatial/`` folder.
        store: artifact store to write to.
        key_prefix: where to write (see :mod:`histoloop.formats.patches` for the layout).
        context: patch side in spot diameters (1 = the spot itself).
        patch_size: output side in pixels (the model input, e.g. 224).
        scale: Space Ranger full-res pixels → slide level-0 pixels.
        offset: added to the scaled position (x, y), level-0 pixels (cropped slides).
        include_off_tissue: also tile spots with ``in_tissue == 0``.
        outside: spots whose centre is outside the slide: ``error`` or ``skip`` (logged).
        check_tissue: fail if most spots fall on background (a wrong ``scale``).
        chunk_size: patches per stored chunk.
        workers: extraction processes; default ``min(2, cpu count)``.
        backend: slide reading backend (``auto`` = direct JPEG where exact).
        cache_tiles: decoded tiles cached per reader.
        on_progress: ``on_progress(done, total)`` after each chunk.

    Returns:
        The keys written and the geometry used.

    Raises:
        SlideNotFound, SlideUnreadable: the slide.
        SpatialFileMissing, BadPositionsFile, BadScaleFactors: the ``spatial/`` folder.
        PositionsOutsideSlide: some spot centres lie outside the slide (``outside='error'``).
        ScaleMismatch: most spots lie outside the slide or on background.
        InvalidArgument: a bad option or no spot to tile.
        ArtifactExists: the prefix holds artifacts already.
    """
    started = time.perf_counter()
    for name, value in (
        ("context", context),
        ("patch_size", patch_size),
        ("scale", scale),
        ("chunk_size", chunk_size),
    ):
        _check_positive(name, value)
    if outside not in ("error", "skip"):
        raise InvalidArgument(f"outside must be 'error' or 'skip', got {outside!r}")
    prefix = _check_prefix(store, key_prefix)
    workers = default_workers() if workers is None else int(workers)
    spatial = read_spatial(spatial_dir)
    positions = spatial.positions
    spots = positions if include_off_tissue else positions[positions["in_tissue"] == 1]
    if spots.empty:
        raise InvalidArgument(
            f"positions file {spatial.positions_file}: no spot has in_tissue = 1 "
            "(pass include_off_tissue=True to tile every spot)"
        )
    spots = spots.reset_index(drop=True)
    notes: list[str] = []
    with open_slide(slide_path, backend=backend, cache_tiles=cache_tiles) as reader:
        width, height = reader.dimensions
        cx = spots["pxl_col_in_fullres"].to_numpy() * scale + offset[0]
        cy = spots["pxl_row_in_fullres"].to_numpy() * scale + offset[1]
        thumb, thumb_ds = reader.thumbnail()
        mask = tissue_mask(thumb, thumb_ds)
        out = (cx < 0) | (cx >= width) | (cy < 0) | (cy >= height)
        n = len(spots)
        if out.sum() * 2 > n:
            raise ScaleMismatch(
                f"{int(out.sum())} of {n} spots of {spatial.positions_file} map outside the "
                f"{width}×{height} slide {reader.path} with scale={scale}, offset={offset}: "
                f"the scale factor is probably wrong{_scale_hint(spots, mask, scale)}"
            )
        if out.any():
            bad = spots["barcode"][out]
            detail = (
                f"{int(out.sum())} of {n} spot centres of {spatial.positions_file} lie outside "
                f"the {width}×{height} slide {reader.path} (scale={scale}), e.g. "
                f"{bad.iloc[0]} at ({cx[out][0]:.0f}, {cy[out][0]:.0f})"
            )
            if outside == "error":
                raise PositionsOutsideSlide(detail + "; pass outside='skip' to leave them out")
            log.warning("%s; skipped", detail)
            notes.append(detail + "; skipped")
            spots, cx, cy = spots[~out].reset_index(drop=True), cx[~out], cy[~out]
        on_tissue = mask.contains(cx, cy)
        if check_tissue and 0.005 < mask.fraction() and on_tissue.mean() < 0.5:
            raise ScaleMismatch(
                f"only {int(on_tissue.sum())} of {len(spots)} spots of "
                f"{spatial.positions_file} fall on tissue of slide {reader.path} with "
                f"scale={scale}: the scale factor (or offset) is probably wrong"
                f"{_scale_hint(spots, mask, scale)}; pass check_tissue=False to tile anyway"
            )

        side0 = spatial.scalefactors.spot_diameter_fullres * scale * context
        level = reader.best_level(side0 / patch_size)
        ds = reader.level_downsamples[level]
        side = max(1, round(side0 / ds))
        xl = np.round(cx / ds - side / 2).astype(np.int64)
        yl = np.round(cy / ds - side / 2).astype(np.int64)

        index = pd.DataFrame(
            {
                "id": spots["barcode"].to_numpy(),
                "level": level,
                "x": np.round(xl * ds).astype(np.int64),
                "y": np.round(yl * ds).astype(np.int64),
                "size": side,
                "size0": side * ds,
                "cx": cx,
                "cy": cy,
                "in_tissue": spots["in_tissue"].to_numpy(),
                "on_tissue_mask": on_tissue.astype(np.int8),
                "array_row": spots["array_row"].to_numpy(),
                "array_col": spots["array_col"].to_numpy(),
                "pxl_row_in_fullres": spots["pxl_row_in_fullres"].to_numpy(),
                "pxl_col_in_fullres": spots["pxl_col_in_fullres"].to_numpy(),
            }
        )
        overlay = draw_overlay(
            thumb,
            thumb_ds,
            circles=(cx, cy, spatial.scalefactors.spot_diameter_fullres * scale),
            circle_ok=on_tissue,
            boxes=(index["x"].to_numpy(), index["y"].to_numpy(), side * ds)
            if context != 1
            else None,
            mask=mask.mask,
        )
        params: dict[str, Any] = {
            "spatial_dir": str(spatial_dir),
            "positions_file": str(spatial.positions_file),
            "spot_diameter_fullres": spatial.scalefactors.spot_diameter_fullres,
            "tissue_hires_scalef": spatial.scalefactors.tissue_hires_scalef,
            "tissue_lowres_scalef": spatial.scalefactors.tissue_lowres_scalef,
            "context": context,
            "scale": scale,
            "offset": list(offset),
            "include_off_tissue": include_off_tissue,
            "n_spots_total": int(len(positions)),
        }
        return _extract_and_store(
            "visium",
            reader,
            store,
            prefix,
            index,
            xl,
            yl,
            level,
            side,
            patch_size,
            chunk_size=chunk_size,
            workers=workers,
            backend=backend,
            cache_tiles=cache_tiles,
            on_progress=on_progress,
            overlay=overlay,
            params=params,
            notes=notes,
            started=started,
        )


def tile_wsi(
    slide_path: str | Path,
    store: ArtifactStore,
    key_prefix: str,
    *,
    mpp: float | None = 0.5,
    tile_size: int = 224,
    slide_mpp: float | None = None,
    stride: int | None = None,
    min_tissue: float = 0.5,
    chunk_size: int = 256,
    workers: int | None = None,
    backend: Backend = "auto",
    cache_tiles: int = 128,
    on_progress: ProgressCallback | None = None,
) -> TilingResult:
    """Tile a whole-slide image on a regular grid at ``mpp`` µm/px, skipping background.

    Tiles cover ``tile_size × mpp / slide_mpp`` level-0 pixels (``tile_size`` when ``mpp``
    is None: the slide's native resolution, no mpp needed), start every ``stride``
    output pixels (default ``tile_size``: no overlap), lie wholly inside the slide, and
    are kept when at least ``min_tissue`` of their area is tissue (Otsu mask of a
    thumbnail).

    Args:
        slide_path: the slide.
        store: artifact store to write to.
        key_prefix: where to write.
        mpp: output resolution, µm per pixel; None for level 0 as it is.
        tile_size: output tile side, pixels.
        slide_mpp: the slide's level-0 µm/px when it has no ``openslide.mpp-x`` property
            (or to override it).
        stride: grid step in output pixels (default ``tile_size``).
        min_tissue: minimum tissue fraction of a kept tile, in [0, 1].
        chunk_size: tiles per stored chunk.
        workers: extraction processes; default ``min(2, cpu count)``.
        backend: slide reading backend.
        cache_tiles: decoded tiles cached per reader.
        on_progress: ``on_progress(done, total)`` after each chunk.

    Raises:
        SlideNotFound, SlideUnreadable: the slide.
        MissingMpp: the slide records no mpp and ``slide_mpp`` was not given.
        NoTissueFound: no tile reaches ``min_tissue``.
        InvalidArgument: a bad option.
        ArtifactExists: the prefix holds artifacts already.
    """
    started = time.perf_counter()
    for name, value in (("tile_size", tile_size), ("chunk_size", chunk_size)):
        _check_positive(name, value)
    if mpp is not None:
        _check_positive("mpp", mpp)
    if stride is not None:
        _check_positive("stride", stride)
    if not 0 <= min_tissue <= 1:
        raise InvalidArgument(f"min_tissue must be in [0, 1], got {min_tissue!r}")
    prefix = _check_prefix(store, key_prefix)
    workers = default_workers() if workers is None else int(workers)
    with open_slide(slide_path, backend=backend, cache_tiles=cache_tiles) as reader:
        if mpp is None:
            base_mpp, need = (slide_mpp or reader.mpp), 1.0
        else:
            base_mpp = reader.require_mpp(slide_mpp, purpose=f"tile at {mpp} µm/px")
            need = mpp / base_mpp
        side0 = tile_size * need
        step0 = (stride or tile_size) * need
        width, height = reader.dimensions
        cols = int(math.floor((width - side0) / step0)) + 1 if width >= side0 else 0
        rows = int(math.floor((height - side0) / step0)) + 1 if height >= side0 else 0
        grid_r, grid_c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
        grid_r, grid_c = grid_r.ravel(), grid_c.ravel()
        x0, y0 = grid_c * step0, grid_r * step0
        thumb, thumb_ds = reader.thumbnail()
        mask = tissue_mask(thumb, thumb_ds)
        frac = mask.box_fraction(x0, y0, side0) if len(x0) else np.zeros(0)
        keep = frac >= min_tissue
        if not keep.any():
            raise NoTissueFound(
                f"slide {reader.path}: none of {len(x0)} tiles of {side0:.0f} level-0 px has "
                f"≥ {min_tissue:.0%} tissue (tissue covers {mask.fraction():.1%} of the "
                "thumbnail); lower min_tissue or check the slide"
            )
        level = reader.best_level(need)
        ds = reader.level_downsamples[level]
        side = max(1, round(side0 / ds))
        xl = np.round(x0[keep] / ds).astype(np.int64)
        yl = np.round(y0[keep] / ds).astype(np.int64)
        rr, cc = grid_r[keep], grid_c[keep]
        index = pd.DataFrame(
            {
                "id": [f"r{r}_c{c}" for r, c in zip(rr.tolist(), cc.tolist(), strict=True)],
                "level": level,
                "x": np.round(xl * ds).astype(np.int64),
                "y": np.round(yl * ds).astype(np.int64),
                "size": side,
                "size0": side * ds,
                "cx": x0[keep] + side0 / 2,
                "cy": y0[keep] + side0 / 2,
                "grid_row": rr,
                "grid_col": cc,
                "tissue_fraction": frac[keep],
            }
        )
        overlay = draw_overlay(thumb, thumb_ds, boxes=(x0[keep], y0[keep], side0), mask=mask.mask)
        params = {
            "mpp": mpp if mpp is not None else base_mpp,
            "slide_mpp": base_mpp,
            "tile_size": tile_size,
            "stride": stride or tile_size,
            "min_tissue": min_tissue,
            "n_grid": int(len(x0)),
            "tissue_threshold": mask.threshold,
        }
        return _extract_and_store(
            "wsi",
            reader,
            store,
            prefix,
            index,
            xl,
            yl,
            level,
            side,
            tile_size,
            chunk_size=chunk_size,
            workers=workers,
            backend=backend,
            cache_tiles=cache_tiles,
            on_progress=on_progress,
            overlay=overlay,
            params=params,
            notes=[],
            started=started,
        )


def _scale_hint(spots: pd.DataFrame, mask: TissueMask, scale: float) -> str:
    """A rough scale suggestion: tissue extent on the slide / spot extent in Space Ranger px."""
    rows, cols = np.nonzero(mask.mask)
    if len(rows) < 2 or len(spots) < 2:
        return ""
    tissue = math.hypot(np.ptp(cols) * mask.downsample, np.ptp(rows) * mask.downsample)
    spot = math.hypot(np.ptp(spots["pxl_col_in_fullres"]), np.ptp(spots["pxl_row_in_fullres"]))
    if spot <= 0 or tissue <= 0:
        return ""
    return f" (tissue and spot extents suggest a scale near {tissue / spot:.3g}, not {scale})"


def _extract_and_store(
    kind: Literal["visium", "wsi"],
    reader: BaseSlide,
    store: ArtifactStore,
    prefix: str,
    index: pd.DataFrame,
    xl: np.ndarray,
    yl: np.ndarray,
    level: int,
    side: int,
    patch_size: int,
    *,
    chunk_size: int,
    workers: int,
    backend: Backend,
    cache_tiles: int,
    on_progress: ProgressCallback | None,
    overlay: bytes,
    params: dict[str, Any],
    notes: Sequence[str],
    started: float,
) -> TilingResult:
    # storage order: bands of tile height, left to right, so neighbouring patches of a
    # chunk share decoded tiles
    band = max(side, 256)
    order = np.lexsort((xl, yl // band))
    index = index.iloc[order].reset_index(drop=True)
    xl, yl = xl[order], yl[order]
    n = len(index)
    index.insert(1, "chunk", np.arange(n) // chunk_size)
    index.insert(2, "offset", np.arange(n) % chunk_size)
    plans = [
        ChunkPlan(
            chunk=c,
            level=level,
            side=side,
            patch_size=patch_size,
            xs=xl[c * chunk_size : (c + 1) * chunk_size],
            ys=yl[c * chunk_size : (c + 1) * chunk_size],
        )
        for c in range(-(-n // chunk_size))
    ]
    keys = [chunk_key(prefix, p.chunk) for p in plans]

    def on_chunk(chunk: int, patches: np.ndarray) -> None:
        store.put(
            keys[chunk], array_to_npy(patches), content_type=_NPY, metadata={"n": str(len(patches))}
        )

    direct = level in reader.direct_levels
    log.info(
        "tiling %s: %d patches from level %d (downsample %.4g, region %d px → %d px) via %s, "
        "%d worker(s)",
        reader.path,
        n,
        level,
        reader.level_downsamples[level],
        side,
        patch_size,
        "direct JPEG"
        if direct
        else ("a plain image" if reader.vendor.startswith("plain-") else "OpenSlide"),
        workers,
    )
    run_extraction(
        reader,
        plans,
        on_chunk,
        workers=workers,
        backend=backend,
        cache_tiles=cache_tiles,
        on_progress=on_progress,
    )
    ikey, okey, mkey = index_key(prefix), overlay_key(prefix), manifest_key(prefix)
    store.put(ikey, index.to_csv(index=False).encode(), content_type="text/csv")
    store.put(okey, overlay, content_type="image/png")
    seconds = time.perf_counter() - started
    manifest = {
        "format": MANIFEST_FORMAT,
        "kind": kind,
        "n": n,
        "patch_size": patch_size,
        "chunk_size": chunk_size,
        "chunks": keys,
        "index": ikey,
        "overlay": okey,
        "level": level,
        "downsample": reader.level_downsamples[level],
        "region_size": side,
        "reader": "direct-jpeg" if direct else "openslide",
        "slide": {
            "path": str(reader.path),
            "vendor": reader.vendor,
            "dimensions": list(reader.dimensions),
            "level_dimensions": [list(d) for d in reader.level_dimensions],
            "level_downsamples": reader.level_downsamples,
            "mpp": reader.mpp,
        },
        "params": params,
        "warnings": list(notes),
        "seconds": round(seconds, 3),
    }
    store.put(mkey, json.dumps(manifest, indent=1).encode(), content_type="application/json")
    return TilingResult(
        kind=kind,
        prefix=prefix,
        manifest_key=mkey,
        index_key=ikey,
        patch_keys=tuple(keys),
        overlay_key=okey,
        n_patches=n,
        patch_size=patch_size,
        level=level,
        downsample=reader.level_downsamples[level],
        region_size=side,
        direct=direct,
        seconds=seconds,
        warnings=tuple(notes),
    )
