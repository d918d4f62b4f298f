"""The HER2+ breast cancer section A1 (Andersson et al. 2021): a labelled H&E benchmark.

Files (``<shared data>/her2st/A1/``, see its SOURCES.md section 3):

- ``A1_HE_image_dark.png``: the H&E scan scaled by 2000/6954, background painted black,
  the pathologist's annotation thumbnail pasted at x 1500–1999, y 0–534 (no spot there);
- ``A1_selection.tsv``: 348 legacy ST spots, pixel positions in the original 6954-px frame;
- ``A1_labeled_coordinates.tsv``: one label per spot, joined on (x, y) = selection
  (new_x, new_y);
- ``A1.tsv.gz``: raw counts, rows ``<x>x<y>`` with the selection's integer array x, y.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histoloop.errors import InvalidArgument, NotFound
from histoloop.formats.legacy_st import read_selection

__all__ = [
    "A1_SLIDE_SCALE",
    "A1_THUMBNAIL_BOX",
    "HER2ST_CLASSES",
    "A1Sample",
    "load_a1",
    "write_counts_h5ad",
]

A1_SLIDE_SCALE = 2000 / 6954
"""PNG px per selection-file px."""
A1_THUMBNAIL_BOX = (1500, 0, 2000, 535)
"""(x0, y0, x1, y1) of the pasted annotation thumbnail in the PNG: mask it for grid tiling."""
HER2ST_CLASSES = (
    "invasive cancer",
    "connective tissue",
    "cancer in situ",
    "adipose tissue",
    "undetermined",
    "immune infiltrate",
)


@dataclass(frozen=True)
class A1Sample:
    """Section A1: its files and the per-spot pathologist labels.

    Attributes:
        folder: the sample folder.
        image: the H&E PNG.
        selection: the legacy ST spot file.
        counts: the raw counts (``A1.tsv.gz``).
        labels: label per barcode (``"<x>x<y>"``), all 348 spots.
    """

    folder: Path
    image: Path
    selection: Path
    counts: Path
    labels: pd.Series


def load_a1(folder: str | Path) -> A1Sample:
    """Load section A1's file paths and labels.

    Raises:
        NotFound: a file is missing.
        InvalidArgument: a spot has no label, or a label row matches no spot.
    """
    folder = Path(folder)
    files = {
        "image": folder / "A1_HE_image_dark.png",
        "selection": folder / "A1_selection.tsv",
        "labels": folder / "A1_labeled_coordinates.tsv",
        "counts": folder / "A1.tsv.gz",
    }
    for path in files.values():
        if not path.is_file():
            raise NotFound(f"her2st A1: {path} does not exist")
    spots = read_selection(files["selection"], keep_extra=True)
    table = pd.read_csv(files["labels"], sep="\t")
    key = _coordinate_key(table["x"], table["y"])
    by_coord = dict(zip(key, table["label"].astype(str), strict=True))
    spot_key = _coordinate_key(spots["new_x"], spots["new_y"])
    missing = [b for b, k in zip(spots["barcode"], spot_key, strict=True) if k not in by_coord]
    if missing:
        raise InvalidArgument(f"her2st A1: {len(missing)} spot(s) have no label, e.g. {missing[0]}")
    labels = pd.Series(
        [by_coord[k] for k in spot_key], index=spots["barcode"].to_numpy(), name="label"
    )
    return A1Sample(
        folder=folder,
        image=files["image"],
        selection=files["selection"],
        counts=files["counts"],
        labels=labels,
    )


def _coordinate_key(x: pd.Series, y: pd.Series) -> list[tuple[float, float]]:
    return list(zip(np.round(x.astype(float), 2), np.round(y.astype(float), 2), strict=True))


def write_counts_h5ad(sample: A1Sample, path: str | Path, *, pad_missing: bool = False) -> Path:
    """Write A1's raw counts (``A1.tsv.gz``: spots × gene symbols) as an ``.h5ad`` that the
    embedding service reads (``X`` = counts as CSR float32, obs = ``<x>x<y>`` barcodes).

    Args:
        sample: from :func:`load_a1`.
        path: the ``.h5ad`` to write.
        pad_missing: add an all-zero row for each labelled spot without a counts row (2 of
            348), so that every spot of the section can be registered with its counts.

    Returns:
        ``path``.
    """
    import anndata as ad
    import scipy.sparse as sp

    table = pd.read_csv(sample.counts, sep="\t", index_col=0)
    table.index = table.index.astype(str)
    if pad_missing:
        missing = [b for b in sample.labels.index if b not in table.index]
        table = pd.concat([table, pd.DataFrame(0, index=missing, columns=table.columns)])
    genes = pd.Index(table.columns.astype(str))
    keep = ~genes.duplicated()
    adata = ad.AnnData(
        X=sp.csr_matrix(table.to_numpy(dtype=np.float32)[:, keep]),
        obs=pd.DataFrame(index=table.index.rename("barcode")),
        var=pd.DataFrame(index=genes[keep].rename("gene")),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path
