"""histoloop tiling: Visium spot patches and WSI grid tiles, stored as chunked arrays.

Public API (domain logic only; the gRPC servicer and event worker wrap it):

- :func:`tile_visium` — one patch per in-tissue Visium spot.
- :func:`tile_wsi` — grid tiles of a plain whole-slide image, background skipped.
- :class:`PatchSet` — read a stored patch set chunk by chunk.
- :class:`SlideReader` — slide access (direct JPEG decoding where exact, else OpenSlide).
- :func:`open_slide` — any slide: OpenSlide, or a plain PNG/JPEG/TIFF (:class:`PlainImageReader`).
- :func:`read_spatial` — parse a Space Ranger ``spatial/`` folder.
"""

from histoloop.formats.patches import MANIFEST_FORMAT, PatchChunk, PatchSet
from histoloop.tiling._errors import (
    BadPositionsFile,
    BadScaleFactors,
    MissingMpp,
    PositionsOutsideSlide,
    ScaleMismatch,
    SlideNotFound,
    SlideUnreadable,
    SpatialFileMissing,
)
from histoloop.tiling._extract import ProgressCallback, default_workers
from histoloop.tiling._plain import PlainImageReader
from histoloop.tiling._slide import Backend, BaseSlide, SlideReader, open_slide
from histoloop.tiling._tiling import NoTissueFound, TilingResult, tile_visium, tile_wsi
from histoloop.tiling._tissue import TissueMask, tissue_mask
from histoloop.tiling._visium import (
    POSITION_COLUMNS,
    ScaleFactors,
    SpatialData,
    read_positions,
    read_scalefactors,
    read_spatial,
)

__all__ = [
    "MANIFEST_FORMAT",
    "POSITION_COLUMNS",
    "Backend",
    "BaseSlide",
    "BadPositionsFile",
    "BadScaleFactors",
    "MissingMpp",
    "NoTissueFound",
    "PatchChunk",
    "PatchSet",
    "PlainImageReader",
    "PositionsOutsideSlide",
    "ProgressCallback",
    "ScaleFactors",
    "ScaleMismatch",
    "SlideNotFound",
    "SlideReader",
    "SlideUnreadable",
    "SpatialData",
    "SpatialFileMissing",
    "TilingResult",
    "TissueMask",
    "default_workers",
    "open_slide",
    "read_positions",
    "read_scalefactors",
    "read_spatial",
    "tile_visium",
    "tile_wsi",
    "tissue_mask",
]
