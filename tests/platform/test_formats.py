"""histoloop.formats: one parser, one key layout, one kappa for every service."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from histoloop.errors import InvalidArgument, NotFound
from histoloop.formats import embeddings, models, querysets
from histoloop.formats.positions import (
    POSITION_COLUMNS,
    BadPositionsFile,
    BadScaleFactors,
    find_positions_file,
    parse_positions,
    parse_scalefactors,
    read_positions,
)
from histoloop.kappa import cohen_kappa

ROWS = ["AAAC-1,1,0,0,10.5,20", "AAAG-1,0,0,2,11,22.25", "AAAT-1,1,1,1,12,24"]


def test_both_flavours_and_any_column_order_give_the_same_spots(tmp_path: Path) -> None:
    header = ",".join(POSITION_COLUMNS)
    with_header = parse_positions("\n".join([header, *ROWS]).encode())
    without = parse_positions("\n".join(ROWS).encode())
    order = [5, 3, 0, 1, 4, 2]
    shuffled_rows = [",".join(row.split(",")[i] for i in order) + ",extra" for row in ROWS]
    shuffled = parse_positions(
        "\n".join(
            [",".join([*(POSITION_COLUMNS[i] for i in order), "note"]), *shuffled_rows]
        ).encode()
    )
    assert with_header.rows == without.rows == shuffled.rows
    assert [r.barcode for r in with_header] == ["AAAC-1", "AAAG-1", "AAAT-1"]
    frame = shuffled.to_frame()
    assert list(frame.columns) == list(POSITION_COLUMNS)
    assert frame["in_tissue"].tolist() == [1, 0, 1] and frame["pxl_col_in_fullres"].tolist() == [
        20,
        22.25,
        24,
    ]
    (tmp_path / "tissue_positions_list.csv").write_text("\n".join(ROWS))
    assert find_positions_file(tmp_path).name == "tissue_positions_list.csv"
    assert read_positions(tmp_path / "tissue_positions_list.csv").rows == without.rows
    with pytest.raises(NotFound, match="is not a folder"):
        find_positions_file(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="neither"):
        find_positions_file(tmp_path / "empty")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "barcode,in_tissue,array_row,array_col,pxl_row\nA-1,1,0,0,1\n",
            "f line 1: missing column.*pxl_col_in_fullres",
        ),
        ("A-1,1,0,0,1,1\nB-1,1,0,0,1\n", "f line 2: 5 columns, expected 6"),
        ("A-1,1,0,0,1,1\n\nA-1,1,0,2,1,1\n", "f line 3: barcode A-1 repeats line 1"),
        ("A-1,1,0.5,0,1,1\n", "f line 1: array_row '0.5' is not an integer"),
        ("A-1,1,0,0,x,1\n", "f line 1: pxl_row_in_fullres 'x' is not a number"),
        ("A-1,yes,0,0,1,1\n", "f line 1: in_tissue 'yes' is not 0 or 1"),
        (",1,0,0,1,1\n", "f line 1: empty barcode"),
        ("\n\n", "f: no spots"),
    ],
)
def test_bad_positions_name_the_file_and_line(text: str, match: str) -> None:
    with pytest.raises(BadPositionsFile, match=match) as err:
        parse_positions(text.encode(), source="f")
    assert isinstance(err.value, InvalidArgument)


def test_scalefactors() -> None:
    parsed = parse_scalefactors(b'{"spot_diameter_fullres": 90.5, "tissue_lowres_scalef": 0.05}')
    assert parsed.spot_diameter_fullres == 90.5 and parsed.tissue_hires_scalef is None
    with pytest.raises(BadScaleFactors, match="'spot_diameter_fullres' is missing"):
        parse_scalefactors(b"{}")
    with pytest.raises(BadScaleFactors, match="tissue_hires_scalef"):
        parse_scalefactors(b'{"spot_diameter_fullres": 1, "tissue_hires_scalef": -1}')


def test_keys_round_trip() -> None:
    key = embeddings.embeddings_key("p1", "ds-1", "abc")
    assert key == "embeddings/p1/ds-1/abc.h5ad"
    for text in (key, f"file:///tmp/store/{key}", f"s3://bucket/{key}"):
        parsed = embeddings.parse_embeddings_key(text)
        assert (parsed.project, parsed.dataset, parsed.artifact_id) == ("p1", "ds-1", "abc")
    with pytest.raises(InvalidArgument, match="not an embeddings key"):
        embeddings.parse_embeddings_key("models/p1/v1/card.json")
    card = models.card_key("p1", "v000001-x")
    assert models.sibling_key(card, models.STATE_FILE) == models.state_key("p1", "v000001-x")
    assert models.sibling_key(card, models.MODULE_FILE) == models.module_key("p1", "v000001-x")
    with pytest.raises(InvalidArgument, match="card"):
        models.sibling_key("models/p1/v1/model.pt", models.STATE_FILE)
    assert querysets.queryset_key("p1", 3, "q") == "querysets/p1/r000003-q.json"
    assert embeddings.embedding_dim({"X_morph": np.zeros((2, 5)), "X_expr": np.zeros((2, 3))}) == 8


def test_one_kappa_agrees_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 4, 50)
        b = np.where(rng.random(50) < 0.6, a, rng.integers(0, 4, 50))
        assert cohen_kappa(a, b) == pytest.approx(cohen_kappa_score(a, b), abs=1e-12)
        assert cohen_kappa(a.astype(str), b.astype(str)) == pytest.approx(cohen_kappa(a, b))
    assert cohen_kappa([2, 2], [2, 2]) == 1.0 and cohen_kappa([], []) == 1.0
    with pytest.raises(InvalidArgument, match="one length"):
        cohen_kappa([1, 2], [1])
