"""The overlay layer as the browser gets it: one compact binary payload, columns back to back.

Layout (little-endian): ``HLU1`` magic, a ``uint32`` header length, the UTF-8 JSON header,
zero padding to a multiple of 8, then each column in the order the header's ``columns``
lists them (name, dtype, byte offset from the start of the column block, length), each
starting on a multiple of 8. Unit ids travel as one ``\\n``-joined UTF-8 column. 100,000
tiles come to about 2.4 MB before gzip.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable

import numpy as np

from histoloop.v1 import annotation_store_pb2 as pb

__all__ = ["MAGIC", "encode_layer"]

MAGIC = b"HLU1"
_NO_UNCERTAINTY = 255


def _pad(n: int) -> int:
    return (-n) % 8


def encode_layer(layer: pb.UnitLayer) -> bytes:
    """Encode a ``UnitLayer`` reply for the page (see the module docstring for the layout)."""
    n = len(layer.unit_ids)

    def column(values: Iterable[float], dtype: type[np.generic]) -> np.ndarray:
        return np.fromiter(values, dtype, count=len(values))  # type: ignore[arg-type]  # a third faster than asarray

    label_dtype = np.int8 if len(layer.classes) < 127 else np.int16
    size = column(layer.size, np.float32)
    uncertainty = column(layer.uncertainty, np.float32)
    scaled = np.where(
        uncertainty < 0, _NO_UNCERTAINTY, np.clip(np.round(uncertainty * 254), 0, 254)
    )
    flags = column(layer.in_tissue, np.uint8) | (column(layer.disputed, np.uint8) << 1)
    rank = column(layer.query_rank, np.uint32)
    rank_dtype = np.uint16 if (rank.max(initial=0) < 65535) else np.uint32
    columns: list[tuple[str, np.ndarray | bytes]] = [
        ("ids", "\n".join(layer.unit_ids).encode()),
        ("x", column(layer.x, np.float32)),
        ("y", column(layer.y, np.float32)),
    ]
    constant_size = bool(n) and bool(np.all(size == size[0]))
    if not constant_size:
        columns.append(("size", size))
    columns += [
        ("consensus", column(layer.consensus, label_dtype)),
        ("mine", column(layer.mine, label_dtype)),
        ("predicted", column(layer.predicted, label_dtype)),
        ("uncertainty", scaled.astype(np.uint8)),
        ("flags", flags.astype(np.uint8)),
        ("query_rank", rank.astype(rank_dtype)),
    ]
    blob = bytearray()
    described = []
    for name, values in columns:
        data = values if isinstance(values, bytes) else values.tobytes()
        dtype = "utf8" if isinstance(values, bytes) else values.dtype.name
        described.append({"name": name, "dtype": dtype, "offset": len(blob), "length": len(data)})
        blob += data + b"\0" * _pad(len(data))
    header = {
        "n": n,
        "project_id": layer.project_id,
        "dataset_id": layer.dataset_id,
        "kind": "wsi" if layer.kind == 2 else "visium",
        "coordinates": layer.coordinates,
        "classes": list(layer.classes),
        "class_colors": list(layer.class_colors),
        "size": float(size[0]) if constant_size else None,
        "queryset_id": layer.queryset_id,
        "round": layer.round,
        "model_version": layer.model_version,
        "caller": layer.caller,
        "votes": [[v.unit, v.annotator_id, v.label] for v in layer.votes],
        "columns": described,
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<I", len(text)) + text
    return bytes(head + b"\0" * _pad(len(head)) + blob)
