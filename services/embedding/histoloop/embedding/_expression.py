"""Gene-expression features for the multimodal model.

Counts come from a 10x ``filtered_feature_bc_matrix.h5`` (HDF5 v3, or v2) or an
``.h5ad``. Features: counts normalised to a fixed total per spot, ``log1p``, the top N
highly variable genes (Seurat-flavour dispersion, as ``scanpy.pp.highly_variable_genes``
with ``flavor="seurat"``; implemented here, scanpy is not a dependency), optionally
z-scored and reduced by PCA. Every parameter needed to repeat the transform is kept in
:class:`ExpressionParams`, so another dataset can be mapped into the same feature space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from histoloop.errors import InvalidArgument, NotFound

__all__ = [
    "ExpressionMatrix",
    "ExpressionParams",
    "fit_expression",
    "highly_variable_genes",
    "log_normalize",
    "read_10x_h5",
    "read_expression",
    "read_h5ad_counts",
    "transform_expression",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpressionMatrix:
    """Raw counts, spots × genes.

    Attributes:
        counts: CSR float32 (n_spots, n_genes).
        barcodes: spot barcodes (rows).
        gene_ids: stable gene ids, e.g. Ensembl (columns); used to match datasets.
        gene_names: gene symbols (same as ids when the file has none).
        source: the file read.
    """

    counts: sp.csr_matrix
    barcodes: np.ndarray
    gene_ids: np.ndarray
    gene_names: np.ndarray
    source: Path

    def subset(self, barcodes: Any) -> ExpressionMatrix:
        """Rows for ``barcodes``, in that order.

        Raises:
            InvalidArgument: a barcode has no expression row.
        """
        where = pd.Index(self.barcodes).get_indexer(list(barcodes))
        if (where < 0).any():
            missing = [b for b, w in zip(barcodes, where, strict=True) if w < 0]
            raise InvalidArgument(
                f"{self.source}: {len(missing)} of {len(where)} barcodes have no expression "
                f"row, e.g. {missing[0]!r}"
            )
        return ExpressionMatrix(
            self.counts[where], self.barcodes[where], self.gene_ids, self.gene_names, self.source
        )


def _strings(values: np.ndarray) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def read_10x_h5(path: str | Path) -> ExpressionMatrix:
    """Read a 10x Genomics feature-barcode matrix HDF5 (v3 ``matrix/``, or v2 per genome).

    Only ``Gene Expression`` features are kept (v3).

    Raises:
        NotFound: no such file.
        InvalidArgument: not an HDF5 file or not in a 10x layout; names the missing dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"expression file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if "matrix" in f:
                group = f["matrix"]
                need = ["barcodes", "data", "indices", "indptr", "shape", "features/id"]
            else:
                genomes = [k for k in f if isinstance(f[k], h5py.Group)]
                if not genomes:
                    raise InvalidArgument(
                        f"{path}: no 'matrix' group (10x HDF5 v3) or genome group (v2)"
                    )
                group = f[genomes[0]]
                need = ["barcodes", "data", "indices", "indptr", "shape", "genes"]
            for name in need:
                if name not in group:
                    raise InvalidArgument(f"{path}: dataset '{group.name}/{name}' is missing")
            n_genes, n_cells = (int(v) for v in group["shape"][:])
            matrix = sp.csc_matrix(
                (group["data"][:].astype(np.float32), group["indices"][:], group["indptr"][:]),
                shape=(n_genes, n_cells),
            )
            barcodes = _strings(group["barcodes"][:])
            if "features" in group:
                ids = _strings(group["features/id"][:])
                names = _strings(group["features/name"][:]) if "name" in group["features"] else ids
                types = (
                    _strings(group["features/feature_type"][:])
                    if "feature_type" in group["features"]
                    else None
                )
            else:
                ids = _strings(group["genes"][:])
                names = _strings(group["gene_names"][:]) if "gene_names" in group else ids
                types = None
    except OSError as exc:
        raise InvalidArgument(f"{path} is not a readable HDF5 file: {exc}") from exc
    counts = matrix.T.tocsr()
    if types is not None:
        keep = types == "Gene Expression"
        if not keep.all():
            counts, ids, names = counts[:, keep], ids[keep], names[keep]
    return ExpressionMatrix(counts, barcodes, ids, names, path)


def read_h5ad_counts(path: str | Path) -> ExpressionMatrix:
    """Read raw counts from an ``.h5ad``: ``layers['counts']`` if present, else ``X``.

    Gene ids come from ``var['gene_ids']`` if present, else ``var_names``; names from
    ``var['gene_name'|'gene_symbols'|'name']`` if present.

    Raises:
        NotFound: no such file.
        InvalidArgument: not readable as AnnData.
    """
    import anndata

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"expression file {path} does not exist")
    try:
        adata = anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise InvalidArgument(f"{path} is not a readable .h5ad file: {exc}") from exc
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if x is None:
        raise InvalidArgument(f"{path}: AnnData has no X and no layers['counts']")
    counts = sp.csr_matrix(x, dtype=np.float32)
    sample = counts.data[:10000]
    if sample.size and not np.allclose(sample, np.round(sample)):
        log.warning("%s: expression values are not whole numbers; expected raw counts", path)
    var = adata.var
    ids = (
        _strings(var["gene_ids"].to_numpy())
        if "gene_ids" in var
        else _strings(var.index.to_numpy())
    )
    names = ids
    for column in ("gene_name", "gene_symbols", "name"):
        if column in var:
            names = _strings(var[column].to_numpy())
            break
    return ExpressionMatrix(counts, _strings(adata.obs_names.to_numpy()), ids, names, path)


def read_expression(path: str | Path) -> ExpressionMatrix:
    """Read counts from a 10x ``.h5`` or an ``.h5ad`` (by suffix).

    Raises:
        NotFound, InvalidArgument: see the readers.
    """
    path = Path(path)
    if path.suffix == ".h5ad":
        return read_h5ad_counts(path)
    if path.suffix in (".h5", ".hdf5"):
        return read_10x_h5(path)
    raise InvalidArgument(f"expression file {path}: expected a 10x .h5 or an .h5ad")


def log_normalize(counts: sp.spmatrix, target_sum: float) -> sp.csr_matrix:
    """Scale each row to ``target_sum`` total counts, then ``log1p`` (spots with no counts stay 0)."""
    counts = sp.csr_matrix(counts, dtype=np.float32)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    out = sp.diags(scale.astype(np.float32)) @ counts
    out = sp.csr_matrix(out)
    out.data = np.log1p(out.data)
    return out


def highly_variable_genes(log_norm: sp.spmatrix, n_top: int, *, n_bins: int = 20) -> np.ndarray:
    """Seurat-flavour highly variable genes of log-normalised data.

    Per gene, on ``expm1`` of the data: mean and variance (ddof 1); dispersion =
    log(variance / mean); genes are binned by log1p(mean) into ``n_bins`` equal-width
    bins, and the dispersion is z-scored within its bin (a bin with one gene gets 1).
    The ``n_top`` genes with the highest normalised dispersion are returned (ties by
    gene order), as column indices in gene order.
    """
    x = sp.csr_matrix(log_norm, dtype=np.float64)
    x.data = np.expm1(x.data)
    n = x.shape[0]
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = x.multiply(x)
    mean_sq = np.asarray(sq.mean(axis=0)).ravel()
    var = (mean_sq - mean**2) * (n / max(n - 1, 1))
    mean = np.where(mean == 0, 1e-12, mean)
    dispersion = var / mean
    with np.errstate(divide="ignore", invalid="ignore"):
        dispersion = np.log(np.where(dispersion == 0, np.nan, dispersion))
    log_mean = np.log1p(mean)
    bins = pd.cut(log_mean, bins=n_bins)
    frame = pd.DataFrame({"disp": dispersion, "bin": bins})
    grouped = frame.groupby("bin", observed=False)["disp"]
    bin_mean = grouped.mean()
    bin_std = grouped.std(ddof=1)
    single = bin_std.isna()
    bin_std[single] = bin_mean[single]
    bin_mean[single] = 0
    codes = bins.codes
    norm = (dispersion - bin_mean.to_numpy()[codes]) / bin_std.to_numpy()[codes]
    norm = np.where(np.isfinite(norm), norm, -np.inf)
    order = np.argsort(-norm, kind="stable")
    return np.sort(order[:n_top])


@dataclass
class ExpressionParams:
    """Everything needed to turn another dataset's counts into the same features.

    Attributes:
        gene_ids: the selected genes (HVGs), in feature order.
        gene_names: their symbols.
        target_sum: total counts each spot is scaled to before ``log1p``.
        n_genes_input: genes in the dataset the parameters were fitted on.
        scale: whether features were z-scored (with ``mean``/``std``) before PCA.
        mean: per-gene means used for z-scoring (or None).
        std: per-gene stds used for z-scoring (or None).
        pca_components: (k, n_hvg) PCA loadings, or None without PCA.
        pca_mean: (n_hvg,) the PCA centre, or None.
        n_bins: HVG mean bins used.
    """

    gene_ids: np.ndarray
    gene_names: np.ndarray
    target_sum: float
    n_genes_input: int
    scale: bool = False
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    pca_components: np.ndarray | None = None
    pca_mean: np.ndarray | None = None
    n_bins: int = 20
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        """Length of the feature vector."""
        if self.pca_components is not None:
            return int(self.pca_components.shape[0])
        return len(self.gene_ids)

    def to_uns(self) -> dict[str, Any]:
        """A dict that AnnData can store in ``uns`` (h5ad-serialisable)."""
        out: dict[str, Any] = {
            "method": "normalize_total+log1p+hvg_seurat"
            + ("+scale" if self.scale else "")
            + ("+pca" if self.pca_components is not None else ""),
            "gene_ids": np.asarray(self.gene_ids, dtype=str),
            "gene_names": np.asarray(self.gene_names, dtype=str),
            "target_sum": float(self.target_sum),
            "n_genes_input": int(self.n_genes_input),
            "scale": bool(self.scale),
            "n_bins": int(self.n_bins),
        }
        for name in ("mean", "std", "pca_components", "pca_mean"):
            value = getattr(self, name)
            if value is not None:
                out[name] = np.asarray(value, dtype=np.float32)
        return out

    @classmethod
    def from_uns(cls, uns: dict[str, Any]) -> ExpressionParams:
        """Inverse of :meth:`to_uns`."""

        def arr(name: str) -> np.ndarray | None:
            return np.asarray(uns[name], dtype=np.float32) if name in uns else None

        return cls(
            gene_ids=np.asarray(uns["gene_ids"], dtype=object),
            gene_names=np.asarray(uns["gene_names"], dtype=object),
            target_sum=float(uns["target_sum"]),
            n_genes_input=int(uns["n_genes_input"]),
            scale=bool(uns.get("scale", False)),
            mean=arr("mean"),
            std=arr("std"),
            pca_components=arr("pca_components"),
            pca_mean=arr("pca_mean"),
            n_bins=int(uns.get("n_bins", 20)),
        )


def fit_expression(
    expr: ExpressionMatrix,
    *,
    n_top_genes: int = 1000,
    target_sum: float | None = 1e4,
    scale: bool = False,
    n_pcs: int | None = None,
    n_bins: int = 20,
    seed: int = 0,
) -> tuple[np.ndarray, ExpressionParams]:
    """Fit the expression transform on a dataset and return its features.

    Args:
        expr: raw counts.
        n_top_genes: highly variable genes to keep; if the dataset has fewer genes,
            all are used and a warning names both numbers.
        target_sum: counts per spot after normalisation (None: the median total).
        scale: z-score each gene (clipped at ±10) before PCA.
        n_pcs: PCA components (None: no PCA, the HVG values are the features).
        n_bins: mean bins for the HVG dispersion normalisation.
        seed: PCA solver seed.

    Returns:
        float32 (n_spots, n_features) and the parameters to transform other datasets.

    Raises:
        InvalidArgument: no genes or spots, or bad options.
    """
    n_spots, n_genes = expr.counts.shape
    if n_spots == 0 or n_genes == 0:
        raise InvalidArgument(f"{expr.source}: empty expression matrix ({n_spots}×{n_genes})")
    if n_top_genes < 1:
        raise InvalidArgument(f"n_top_genes must be ≥ 1, got {n_top_genes}")
    if target_sum is None:
        totals = np.asarray(expr.counts.sum(axis=1)).ravel()
        target_sum = float(np.median(totals[totals > 0])) if (totals > 0).any() else 1.0
    norm = log_normalize(expr.counts, target_sum)
    if n_genes <= n_top_genes:
        if n_genes < n_top_genes:
            log.warning(
                "%s has %d genes, fewer than the %d highly variable genes asked for; using all %d",
                expr.source,
                n_genes,
                n_top_genes,
                n_genes,
            )
        hvg = np.arange(n_genes)
    else:
        hvg = highly_variable_genes(norm, n_top_genes, n_bins=n_bins)
    x = norm[:, hvg].toarray().astype(np.float32)
    params = ExpressionParams(
        gene_ids=expr.gene_ids[hvg],
        gene_names=expr.gene_names[hvg],
        target_sum=float(target_sum),
        n_genes_input=int(n_genes),
        scale=scale,
        n_bins=n_bins,
    )
    if scale:
        params.mean = x.mean(axis=0)
        std = x.std(axis=0, ddof=1) if n_spots > 1 else np.ones(x.shape[1], np.float32)
        params.std = np.where(std > 0, std, 1).astype(np.float32)
        x = np.clip((x - params.mean) / params.std, -10, 10)
    if n_pcs is not None:
        from sklearn.decomposition import PCA

        k = min(int(n_pcs), n_spots, x.shape[1])
        if k < int(n_pcs):
            log.warning(
                "%s: %d principal components asked for, %d possible; using %d",
                expr.source,
                n_pcs,
                k,
                k,
            )
        pca = PCA(n_components=k, svd_solver="full", random_state=seed).fit(x)
        params.pca_components = pca.components_.astype(np.float32)
        params.pca_mean = pca.mean_.astype(np.float32)
        x = (x - params.pca_mean) @ params.pca_components.T
    return x.astype(np.float32), params


def transform_expression(expr: ExpressionMatrix, params: ExpressionParams) -> np.ndarray:
    """Map a dataset into the feature space fitted on another (transfer).

    Each spot is normalised by its own total over all its genes; the selected genes are
    matched by id, and genes the dataset lacks are zero (with a warning naming how many).

    Returns:
        float32 (n_spots, params.n_features).
    """
    norm = log_normalize(expr.counts, params.target_sum)
    where = pd.Index(expr.gene_ids).get_indexer(list(params.gene_ids))
    missing = int((where < 0).sum())
    if missing == len(where):
        raise InvalidArgument(
            f"{expr.source}: none of the {len(where)} selected genes is present "
            "(gene ids must match, e.g. Ensembl ids on both datasets)"
        )
    if missing:
        log.warning(
            "%s lacks %d of the %d selected genes; their values are set to 0",
            expr.source,
            missing,
            len(where),
        )
    x = np.zeros((expr.counts.shape[0], len(where)), dtype=np.float32)
    present = where >= 0
    x[:, present] = norm[:, where[present]].toarray()
    if params.scale and params.mean is not None and params.std is not None:
        x = np.clip((x - params.mean) / params.std, -10, 10)
    if params.pca_components is not None and params.pca_mean is not None:
        x = (x - params.pca_mean) @ params.pca_components.T
    return x.astype(np.float32)
