"""Campaigns end to end: outputs, determinism, resume after a kill, argument checks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from histoloop.errors import InvalidArgument
from histoloop.simulation import (
    SimulationConfig,
    label_schedule,
    parse_schedule,
    run_campaign,
)

OUTPUTS = (
    "rounds.jsonl",
    "learning_curves.png",
    "efficiency.png",
    "comparison.json",
    "comparison.md",
    "comparison.tex",
    "campaign.json",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _numbers(folder: Path) -> list[dict]:
    """Every record of a campaign without its wall-clock timings."""
    out = []
    for line in (folder / "rounds.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.append({k: v for k, v in rec.items() if not k.endswith("_seconds")})
    return out


def _table(folder: Path) -> dict:
    """comparison.json without the timing columns."""
    table = json.loads((folder / "comparison.json").read_text())
    table["rows"] = [
        {k: v for k, v in row.items() if not k.endswith("seconds_mean")} for row in table["rows"]
    ]
    return table


@pytest.fixture(scope="module")
def reference(small_adata, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted campaign, in this process."""
    cfg = SimulationConfig(
        label_column="layer",
        pca=10,
        neighbours=6,
        heads=("logreg",),
        strategies=("random", "entropy", "typiclust"),
        seeds=2,
        query_size=20,
        rounds=4,
    )
    folder = tmp_path_factory.mktemp("reference") / "campaign"
    return run_campaign(small_adata, cfg, folder, workers=1, progress=False)


def test_campaign_writes_every_output(reference) -> None:
    assert reference.complete
    for name in OUTPUTS:
        path = reference.folder / name
        assert path.is_file() and path.stat().st_size > 0, name
        assert reference.files[name] == path
    for name in ("learning_curves.png", "efficiency.png"):
        assert (reference.folder / name).read_bytes()[:8] == PNG_MAGIC
    records = _numbers(reference.folder)
    # 2 seeds × (3 strategies × 5 rounds + 1 full-supervision reference)
    assert len(records) == 2 * (3 * 5 + 1)
    first = next(r for r in records if r["strategy"] == "entropy" and r["round"] == 0)
    assert first["labels"] == 7 and len(first["picked"]) == 7  # one seed label per class
    for key in ("macro_f1", "balanced_accuracy", "accuracy", "kappa", "per_class_f1", "fraction"):
        assert key in first
    # every strategy starts from the same initial set per seed
    for seed in (0, 1):
        starts = {
            tuple(r["picked"])
            for r in records
            if r["seed"] == seed and r["round"] == 0 and r["strategy"] != "full"
        }
        assert len(starts) == 1
    comparison = reference.comparison
    assert {(r["head"], r["strategy"]) for r in comparison["rows"]} == {
        ("logreg", "random"),
        ("logreg", "entropy"),
        ("logreg", "typiclust"),
    }
    random_row = next(r for r in comparison["rows"] if r["strategy"] == "random")
    if random_row["ratio_to_random"] is not None:
        assert random_row["ratio_to_random"] == pytest.approx(1.0)
    entropy = next(r for r in comparison["rows"] if r["strategy"] == "entropy")
    assert set(entropy["aulc_gain"]) >= {"mean", "p_wilcoxon", "p_ttest"}
    assert "full supervision" in (reference.folder / "comparison.md").read_text()
    assert "\\begin{tabular}" in (reference.folder / "comparison.tex").read_text()


def test_same_seeds_give_the_same_numbers(
    reference, small_adata, config: SimulationConfig, tmp_path: Path
) -> None:
    again = run_campaign(small_adata, config, tmp_path / "again", workers=1, progress=False)
    assert again.campaign_id == reference.campaign_id
    assert _numbers(again.folder) == _numbers(reference.folder)
    assert _table(again.folder) == _table(reference.folder)
    for name in (
        "learning_curves.png",
        "efficiency.png",
    ):  # no timings in the plots: the same bytes
        assert (again.folder / name).read_bytes() == (reference.folder / name).read_bytes()


@pytest.mark.integration  # spawns worker processes
def test_parallel_workers_give_the_same_numbers(
    reference, small_h5ad: Path, config: SimulationConfig, tmp_path: Path
) -> None:
    parallel = run_campaign(small_h5ad, config, tmp_path / "parallel", workers=2, progress=False)
    assert _numbers(parallel.folder) == _numbers(reference.folder)


def test_resume_after_a_kill_equals_an_uninterrupted_run(
    reference, small_adata, config: SimulationConfig, tmp_path: Path
) -> None:
    folder = tmp_path / "killed"
    first = run_campaign(small_adata, config, folder, workers=1, progress=False, max_new_rounds=2)
    assert not first.complete and first.comparison is None
    assert not (folder / "comparison.md").exists()
    # the kill struck while a record was being written
    with open(folder / "runs" / "logreg.entropy.seed1.jsonl", "a") as fh:
        fh.write('{"round": 2, "head": "logreg", "macro_')
    with pytest.raises(InvalidArgument, match="out"):  # not without resume
        run_campaign(small_adata, config, folder, workers=1, progress=False)
    second = run_campaign(small_adata, config, folder, workers=1, progress=False, resume=True)
    assert second.complete
    assert 0 < second.rounds_run < first.rounds_run + second.rounds_run
    assert _numbers(folder) == _numbers(reference.folder)
    assert not list((folder / "runs").glob("*.model"))  # finished runs keep no model
    third = run_campaign(small_adata, config, folder, workers=1, progress=False, resume=True)
    assert third.rounds_run == 0 and third.complete


def test_resume_refuses_other_settings(reference, small_adata, config: SimulationConfig) -> None:
    with pytest.raises(InvalidArgument, match="query_size"):
        run_campaign(
            small_adata,
            replace(config, query_size=25),
            reference.folder,
            workers=1,
            progress=False,
            resume=True,
        )


def test_outputs_go_to_the_artifact_store(
    small_adata, config: SimulationConfig, tmp_path: Path
) -> None:
    from histoloop.artifacts.local import LocalArtifactStore

    store = LocalArtifactStore(tmp_path / "artifacts")
    result = run_campaign(
        small_adata,
        replace(config, strategies=("random", "margin"), seeds=2, rounds=2),
        tmp_path / "c",
        workers=1,
        progress=False,
        store=store,
    )
    assert set(result.uris) == set(OUTPUTS)
    key = store.key_from_uri(result.uris["efficiency.png"])
    assert key == f"simulations/{result.campaign_id}/efficiency.png"
    assert store.get(key)[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"strategies": ("entropy", "no_such_strategy")}, "strategies"),
        ({"strategies": ("bald",)}, "strategies"),  # needs the ensemble head
        ({"label_column": "no_such_column"}, "label_column"),
        ({"obsm": ("X_missing",)}, "obsm"),
        ({"heads": ("multimodal",)}, "heads"),
        ({"seeds": 0}, "seeds"),
        ({"schedule": (0.5, 0.2)}, "schedule"),
        ({"rounds": 3, "budget": 100}, "rounds and budget"),
        ({"initial": "entropy"}, "initial"),
        ({"pca": 5000}, "pca"),
        ({"metric": "auc"}, "metric"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"raters": ("exact",)}, "raters"),
        ({"raters": ("exact", "sloppy")}, "raters"),
        ({"raters": ("exact", "merge:Layer9:Layer5")}, "raters"),
        (
            {"loop": {"strategy": "margin"}},
            "loop: strategy cannot be set here",
        ),  # the campaign's own field
        ({"loop": {"hybrid_share": 1.5}, "strategies": ("hybrid",)}, "loop: share"),
        ({"loop": {"kmeans_pick": "middle"}, "strategies": ("kmeans",)}, "loop: .*pick"),
        ({"loop": {"stop_patience": "many"}}, "loop: "),
        ({"loop": {"preset": "no_such_preset"}}, "loop: .*preset"),
    ],
)
def test_bad_arguments_are_rejected_naming_the_field(
    small_adata, config: SimulationConfig, tmp_path: Path, change: dict, field: str
) -> None:
    folder = tmp_path / "never"
    with pytest.raises(InvalidArgument, match=field):
        run_campaign(small_adata, replace(config, **change), folder, workers=1, progress=False)
    assert not folder.exists()


def test_neighbours_need_positions(small_adata, config: SimulationConfig, tmp_path: Path) -> None:
    bare = small_adata.copy()
    bare.obs = bare.obs.drop(columns=["array_row", "array_col"])
    del bare.obsm["spatial"]
    with pytest.raises(InvalidArgument, match="neighbours"):
        run_campaign(bare, config, tmp_path / "x", workers=1, progress=False)
    assert not (tmp_path / "x").exists()


def test_missing_data_file_is_named(config: SimulationConfig, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="data"):
        run_campaign(tmp_path / "nope.h5ad", config, tmp_path / "x", workers=1, progress=False)


def test_schedules() -> None:
    assert parse_schedule("0.1:1.0:0.1") == pytest.approx([0.1 * i for i in range(1, 11)])
    assert parse_schedule("0.02:0.06:0.02,0.5,0.9") == pytest.approx([0.02, 0.04, 0.06, 0.5, 0.9])
    for bad in ("", "a:b", "0.5:0.1:0.1", "0.1,0.1", "0:0.5:0.1", "1.5", "0.1:0.2"):
        with pytest.raises(InvalidArgument, match="schedule"):
            parse_schedule(bad)
    cfg = SimulationConfig(query_size=46, budget=200, schedule=(0.5, 0.9))
    assert label_schedule(cfg, 1000, 7) == (7, 53, 99, 145, 191, 200, 500, 900)
    assert label_schedule(SimulationConfig(query_size=10, rounds=3), 1000, 7) == (7, 17, 27, 37)
    assert label_schedule(SimulationConfig(schedule=(0.1, 1.0)), 1000, 7) == (7, 100, 1000)
    assert label_schedule(SimulationConfig(query_size=400, rounds=5), 1000, 7)[-1] == 1000


def test_rater_disagreement_queries_where_simulated_raters_differ(
    small_adata, config: SimulationConfig, tmp_path: Path
) -> None:
    from histoloop.simulation import prepare_data

    def picks(cfg: SimulationConfig, folder: str) -> dict[str, list[int]]:
        result = run_campaign(small_adata, cfg, tmp_path / folder, workers=1, progress=False)
        return {
            s: [
                i
                for r in _numbers(result.folder)
                if r["strategy"] == s and r["round"] > 0
                for i in r["picked"]
            ]
            for s in cfg.strategies
        }

    plain = replace(
        config,
        strategies=("entropy", "rater_disagreement"),
        seeds=1,
        rounds=3,
        initial="random",
        initial_size=80,
    )
    cfg = replace(
        plain, raters=("exact", "merge:Layer6:Layer5")
    )  # one rater folds Layer6 into Layer5
    with_raters, without = picks(cfg, "raters"), picks(plain, "plain")
    raters = prepare_data(small_adata, cfg).problem.raters
    assert [name for name, _ in raters] == ["exact", "merge:Layer6:Layer5"]
    differ = raters[0][1] != raters[1][1]  # the Layer6 spots
    assert differ[with_raters["rater_disagreement"]].mean() > 3 * differ.mean()
    assert with_raters["rater_disagreement"] != with_raters["entropy"]
    assert without["rater_disagreement"] == without["entropy"]  # no raters: the entropy fallback
