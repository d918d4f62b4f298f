"""Loupe Browser category CSV, in and out.

Loupe exports a category as ``Barcode,<group name>`` (e.g. ``Pathologist Annotations``),
one spot per row, comma-separated, UTF-8. ActiveVisium's convention, kept here: the label
``help`` marks a spot the model asks about — a placeholder, never a label. Rows with an
empty label (spots not in the category) are skipped.

Exports use the same shape (``\\n`` line ends, minimal quoting), so a file exported here
loads into Loupe as a category and imports back unchanged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from histoloop.annotation_store.domain import HELP_LABEL, SpotLabelInput
from histoloop.errors import InvalidArgument

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_PREDICTIONS_GROUP",
    "MAX_CSV_BYTES",
    "LoupeImport",
    "check_upload_size",
    "labels_csv",
    "parse_loupe_csv",
    "predictions_csv",
    "query_set_csv",
    "write_loupe_csv",
]

MAX_CSV_BYTES = 64 * 1024 * 1024
"""Largest CSV accepted (the gRPC message limit, ``histoloop.server.MAX_MESSAGE_BYTES``, is the same)."""
DEFAULT_GROUP = "Pathologist Annotations"
DEFAULT_PREDICTIONS_GROUP = "Predictions"
_DELIMITERS = {";": "';'", "\t": "a tab", "|": "'|'"}


@dataclass(frozen=True)
class LoupeImport:
    """A parsed Loupe CSV."""

    group: str
    labels: tuple[SpotLabelInput, ...]
    placeholders: tuple[str, ...]
    """Barcodes marked ``help``."""
    n_empty: int
    """Rows with an empty label (skipped)."""


def check_upload_size(n_bytes: int, *, limit: int = MAX_CSV_BYTES, field: str = "csv") -> None:
    """Reject an upload by its (declared) size before reading it.

    Raises:
        InvalidArgument: ``n_bytes`` exceeds ``limit``.
    """
    if n_bytes > limit:
        raise InvalidArgument(
            f"{field}: {n_bytes} bytes is larger than the {limit // (1024 * 1024)} MiB limit; "
            "split the file per dataset or submit labels in batches"
        )


def parse_loupe_csv(data: bytes, *, limit: int = MAX_CSV_BYTES) -> LoupeImport:
    """Parse a Loupe category CSV.

    Raises:
        InvalidArgument: too large, empty, not UTF-8, not comma-separated, a header other
            than ``Barcode,<group>``, a row without exactly two cells or with an empty
            barcode, or no rows — the message names the line.
    """
    check_upload_size(len(data), limit=limit)
    if not data.strip():
        raise InvalidArgument("csv: the file is empty; expected a header 'Barcode,<group name>'")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidArgument(
            f"csv line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            "export the CSV from Loupe Browser or save it as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except (StopIteration, csv.Error) as exc:
        raise InvalidArgument(f"csv line 1: unreadable header ({exc})") from None
    _check_header(header)
    group = header[1].strip()
    labels: list[SpotLabelInput] = []
    placeholders: list[str] = []
    n_empty = n_rows = 0
    try:
        for cells in reader:
            line = reader.line_num
            if not cells or (len(cells) == 1 and not cells[0].strip()):
                continue  # blank line
            n_rows += 1
            if len(cells) != 2:
                hint = _delimiter_hint(",".join(cells)) if len(cells) == 1 else ""
                raise InvalidArgument(
                    f"csv line {line}: {len(cells)} cells, expected 2 (Barcode,{group}){hint}"
                )
            barcode, label = cells[0].strip(), cells[1].strip()
            if not barcode:
                raise InvalidArgument(f"csv line {line}: empty barcode")
            if not label:
                n_empty += 1
            elif label.lower() == HELP_LABEL:
                placeholders.append(barcode)
            else:
                labels.append(SpotLabelInput(barcode=barcode, label=label, row=f"csv line {line}"))
    except csv.Error as exc:
        raise InvalidArgument(f"csv line {reader.line_num}: {exc}") from None
    if n_rows == 0:
        raise InvalidArgument("csv: no rows after the header")
    return LoupeImport(
        group=group, labels=tuple(labels), placeholders=tuple(placeholders), n_empty=n_empty
    )


def _check_header(header: Sequence[str]) -> None:
    joined = ",".join(header)
    if len(header) == 1:
        raise InvalidArgument(
            f"csv line 1: header {joined[:80]!r} has one column{_delimiter_hint(joined)}; "
            "expected 'Barcode,<group name>'"
        )
    if len(header) != 2 or header[0].strip().lower() != "barcode" or not header[1].strip():
        raise InvalidArgument(f"csv line 1: header {joined[:80]!r} is not 'Barcode,<group name>'")


def _delimiter_hint(text: str) -> str:
    for delimiter, name in _DELIMITERS.items():
        if delimiter in text:
            return f" (the delimiter looks like {name}; Loupe CSV is comma-separated)"
    return ""


def write_loupe_csv(rows: Iterable[tuple[str, str]], group: str) -> tuple[bytes, int]:
    """``Barcode,<group>`` then one ``barcode,label`` row each; returns (UTF-8 bytes, rows)."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["Barcode", group])
    n = 0
    for barcode, label in rows:
        writer.writerow([barcode, label])
        n += 1
    return out.getvalue().encode("utf-8"), n


def _ordered(barcodes: Iterable[str], order: Sequence[str] | None) -> list[str]:
    wanted = set(barcodes)
    if order is None:
        return sorted(wanted)
    listed = [b for b in order if b in wanted]
    seen = set(listed)
    return listed + sorted(wanted - seen)


def labels_csv(
    labels: Mapping[str, str], *, group: str = DEFAULT_GROUP, order: Sequence[str] | None = None
) -> tuple[bytes, int]:
    """The (consensus) labels as a Loupe category; ``order`` is the dataset's spot order."""
    return write_loupe_csv(((b, labels[b]) for b in _ordered(labels, order)), group)


def query_set_csv(
    query_barcodes: Iterable[str], *, group: str = DEFAULT_GROUP, order: Sequence[str] | None = None
) -> tuple[bytes, int]:
    """A query set as a Loupe category: every query spot marked ``help``, nothing else."""
    return write_loupe_csv(((b, HELP_LABEL) for b in _ordered(query_barcodes, order)), group)


def predictions_csv(
    predictions: Mapping[str, str],
    query_barcodes: Iterable[str],
    *,
    group: str = DEFAULT_PREDICTIONS_GROUP,
    order: Sequence[str] | None = None,
) -> tuple[bytes, int]:
    """Predicted labels as a Loupe category with the query spots marked ``help``.

    Args:
        predictions: barcode → predicted class.
        query_barcodes: the spots of the current query set (override their prediction).
        group: the category name (second header cell).
        order: the dataset's spot order (others follow, sorted).
    """
    query = set(query_barcodes)
    everything = set(predictions) | query
    rows = ((b, HELP_LABEL if b in query else predictions[b]) for b in _ordered(everything, order))
    return write_loupe_csv(rows, group)
