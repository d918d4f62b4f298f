"""Build a Visium-like ``spatial/`` folder on a real slide (Space Ranger's file formats)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import openslide
from skimage.color import rgb2hsv

PITCH_UM = 100.0  # centre-to-centre distance of neighbouring spots
SPOT_UM = 55.0  # spot diameter
HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"


def make_visium(
    slide: Path,
    out: Path,
    *,
    flavour: Literal["list", "header"] = "header",
    fullres_factor: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write ``out/spatial/`` with a hexagonal spot grid covering ``slide``.

    Space Ranger's full-res image is taken to be the slide scaled by ``fullres_factor``
    (so tile with ``scale=1/fullres_factor``). ``in_tissue`` is 1 where the slide's
    thumbnail is saturated (stained) at the spot centre. Returns the spatial folder.
    """
    osr = openslide.OpenSlide(str(slide))
    mpp = float(osr.properties[openslide.PROPERTY_NAME_MPP_X])
    width, height = osr.dimensions
    thumb = np.asarray(osr.get_thumbnail((512, 512)).convert("RGB"))
    osr.close()
    t_ds = width / thumb.shape[1]
    sat = rgb2hsv(thumb)[..., 1]
    col_step = PITCH_UM / 2 / mpp  # array_col advances 2 per neighbour in a row
    row_step = PITCH_UM * math.sqrt(3) / 2 / mpp
    spot_px = SPOT_UM / mpp
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(int((height - spot_px) // row_step) + 1):
        for c in range(r % 2, int((width - spot_px) // col_step) + 1, 2):
            x = spot_px / 2 + c * col_step
            y = spot_px / 2 + r * row_step
            if x >= width or y >= height:
                continue
            ty, tx = min(int(y / t_ds), sat.shape[0] - 1), min(int(x / t_ds), sat.shape[1] - 1)
            in_tissue = int(sat[max(ty - 1, 0) : ty + 2, max(tx - 1, 0) : tx + 2].mean() > 0.08)
            code = "".join(rng.choice(list("ACGT"), 16))
            # positions are whole pixels at the slide's resolution, then scaled
            rows.append(
                (f"{code}-1", in_tissue, r, c, round(y) * fullres_factor, round(x) * fullres_factor)
            )
    spatial = out / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    lines = [f"{b},{t},{r},{c},{round(py)},{round(px)}" for b, t, r, c, py, px in rows]
    if flavour == "header":
        (spatial / "tissue_positions.csv").write_text("\n".join([HEADER, *lines]) + "\n")
    else:
        (spatial / "tissue_positions_list.csv").write_text("\n".join(lines) + "\n")
    (spatial / "scalefactors_json.json").write_text(
        json.dumps(
            {
                "spot_diameter_fullres": spot_px * fullres_factor,
                "tissue_hires_scalef": 2000 / (max(width, height) * fullres_factor),
                "fiducial_diameter_fullres": spot_px * fullres_factor * 1.5,
                "tissue_lowres_scalef": 600 / (max(width, height) * fullres_factor),
            }
        )
    )
    return spatial
