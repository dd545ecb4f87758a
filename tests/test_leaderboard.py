"""The leaderboard stage: the best heads on the current cache from the ledger, from the cache file alone; --all."""
from __future__ import annotations

import shutil

import run_pipeline
from pipeline.metrics import read_metrics
from tests.conftest import tiny_overrides


def sets(overrides, *extra):
    return [a for s in list(overrides) + list(extra) for a in ("--set", s)]


def table_rows(out: str) -> list[tuple[str, float]]:
    """(head type, val top-1) of each row of the printed leaderboard (columns padded to the header)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    at = lines[start].index("val top-1")
    rows = [line for line in lines[start + 2:] if line[:1].isdigit()]
    return [(line.split()[1], float(line[at:at + 9])) for line in rows]


def test_best_heads_on_this_cache_best_first_from_the_cache_file_alone(tmp_path, image_root, capsys):
    overrides = tiny_overrides(tmp_path, image_root)
    assert run_pipeline.main(sets(overrides, "head.lr=0.0001", "head.epochs=1") + ["head"]) == 0
    assert run_pipeline.main(sets(overrides) + ["logistic"]) == 0
    assert run_pipeline.main(sets(overrides, "head.type=knn", "head.k=3") + ["head"]) == 0
    capsys.readouterr()
    assert run_pipeline.main(sets(overrides) + ["leaderboard"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert len(rows) == 3 and {head for head, _ in rows} == {"linear", "logistic", "knn"}
    scores = [score for _, score in rows]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0
    assert "no test split was scored" in out
    n_val = sum(1 for _ in (image_root / "val").rglob("*.png"))
    assert f"val has {n_val} images" in out and "the best head's 95% interval is" in out   # each entry keeps n_val
    cache_file = read_metrics(tmp_path / "runs" / "t")["extract"]["cache_file"]
    shutil.rmtree(image_root)                                   # a laptop with the cache file but no images
    assert run_pipeline.main(sets(overrides, f"features.file={cache_file}") + ["leaderboard"]) == 0
    assert table_rows(capsys.readouterr().out) == rows


def test_all_lists_every_cache_and_an_empty_ledger_says_so(tmp_path, image_root, capsys):
    overrides = tiny_overrides(tmp_path, image_root)
    assert run_pipeline.main(sets(overrides) + ["leaderboard", "--all"]) == 0
    assert "the ledger is empty" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "t").exists()               # it takes no run folder
    assert run_pipeline.main(sets(overrides) + ["head"]) == 0
    assert run_pipeline.main(sets(overrides, "backbone.image_size=40", "run.name=big") + ["head"]) == 0
    capsys.readouterr()
    assert run_pipeline.main(sets(overrides) + ["leaderboard", "--all"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if " resnet18 " in line]) == 2 and "2 heads" in out


def test_help_describes_the_new_stages_and_keys():
    text = run_pipeline.get_args_parser().format_help()
    for word in ("sweep ", "leaderboard ", "--all", "head.class_weight (default \"none\")", "head.hidden (default 512)",
                 "head.dropout", "head.k (default 20)", "head.temperature (default 0.07)", "sweep.grid (default {",
                 "sweep.top", "leaderboard.all (default false)", "leaderboard.top", "linear, mlp, knn, ncm"):
        assert word in text, word


def test_a_fresh_cache_says_how_to_fill_it_damaged_lines_are_counted_and_a_missing_file_is_named(tmp_path, image_root,
                                                                                                capsys):
    from pipeline.head_outputs import ledger_path

    overrides = tiny_overrides(tmp_path, image_root)
    assert run_pipeline.main(sets(overrides) + ["head"]) == 0
    capsys.readouterr()
    assert run_pipeline.main(sets(overrides, "backbone.image_size=40") + ["leaderboard"]) == 0   # nothing on it yet
    assert "train heads with: python run_pipeline.py head | logistic | sweep" in capsys.readouterr().out
    ledger = ledger_path(tmp_path / "runs")
    with open(ledger, "a", encoding="utf-8") as f:
        f.write('{"cache_key": "torn\n')                    # a line cut short, as by a full disk
    assert run_pipeline.main(sets(overrides) + ["leaderboard"]) == 0
    out = capsys.readouterr().out
    assert f"leaderboard: skipped 1 damaged line(s) of {ledger}" in out and len(table_rows(out)) == 1
    missing = tmp_path / "nowhere.h5"
    assert run_pipeline.main(sets(overrides, f"features.file={missing}") + ["leaderboard"]) == 2
    assert f"features.file '{missing}' is not a file: give the path of a cache" in capsys.readouterr().err
