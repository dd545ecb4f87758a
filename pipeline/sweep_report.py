"""Reports of a sweep (pipeline.sweep): the leaderboard as text and Markdown, sweep.json, sweep.png.

    outcome = run_sweep(configs, X, y, X_val, y_val, X_test, y_test)
    print(format_leaderboard(outcome))
    write_sweep_reports(outcome, "runs/sweep", grid)
    plot_sweep(outcome_from_summary(json.loads(Path("runs/sweep/sweep.json").read_text())), "sweep.png")

Every file is written whole or not at all (a temporary file, then os.replace). matplotlib is imported
only by plot_sweep. sweep.json holds everything plot_sweep draws, so `report` redraws sweep.png from it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.analysis import ranking_note, wilson_interval
from pipeline.fsutil import atomic_write_bytes
from pipeline.plots import PNG, text_width
from pipeline.sweep import (JOINT_NOTE, NO_TEST_NOTE, SWEEP_JSON, SWEEP_MD, SWEEP_PNG, SWEEP_TYPES, TEST_NOTE,
                            SweepConfig, SweepOutcome, SweepResult)


def _f(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.4f}"


def leaderboard_rows(outcome: SweepOutcome, top: Optional[int] = None) -> tuple[list[str], list[list[str]]]:
    header = ["rank", "head", "params", "val top-1", "val mean/class"]
    if outcome.has_test:
        header += ["test top-1", "test mean/class"]
    header.append("seconds")
    rows = []
    for i, r in enumerate(outcome.ranked()[:top], 1):
        row = [str(i), r.head_type, r.config.label(), _f(r.val_acc), _f(r.val_mean_per_class)]
        if outcome.has_test:
            row += [_f(r.test_acc), _f(r.test_mean_per_class)]
        row.append(f"{r.seconds:.3f}{'*' if r.joint else ''}")
        rows.append(row)
    return header, rows


def headline(outcome: SweepOutcome) -> str:
    """One line naming the winner and its headline figure (test when there is a test split)."""
    w = outcome.winner
    if w is None:
        return "sweep: no configuration finished"
    done = (f"{len(outcome.results)} of {outcome.planned} configurations"
            + (" (interrupted)" if outcome.interrupted else "") + f" in {outcome.seconds:.1f} s")
    if outcome.has_test:
        figure = f"test top-1 {_f(w.test_acc)}, mean per-class {_f(w.test_mean_per_class)} (val top-1 {_f(w.val_acc)})"
    else:
        figure = f"val top-1 {_f(w.val_acc)}, mean per-class {_f(w.val_mean_per_class)} (also used for selection)"
    return f"sweep winner: {w.head_type} {w.config.label()}: {figure}; {done}"


def winner_interval(outcome: SweepOutcome) -> Optional[tuple[float, float]]:
    """The 95 % Wilson interval of the winner's val top-1, or None (no winner, or val's size not known)."""
    if outcome.winner is None or not outcome.n_val:
        return None
    return wilson_interval(outcome.winner.val_acc, outcome.n_val)


def interval_note(outcome: SweepOutcome) -> Optional[str]:
    """How much val's size lets a ranking say: one image's share of top-1, the winner's 95 % interval and
    how many other configurations score inside it (and the winner's test interval, with a test split)."""
    w = outcome.winner
    if w is None or not outcome.n_val:
        return None
    note = ranking_note(outcome.n_val, w.val_acc, [r.val_acc for r in outcome.ranked()[1:]], "configurations")
    if outcome.n_test and w.test_acc is not None:
        t_lo, t_hi = wilson_interval(w.test_acc, outcome.n_test)
        note += (f"; test has {outcome.n_test} images: the winner's test top-1 {w.test_acc:.4f} has a 95% interval "
                 f"of {t_lo:.4f}-{t_hi:.4f}")
    return note


def notes(outcome: SweepOutcome) -> list[str]:
    out = [TEST_NOTE if outcome.has_test else NO_TEST_NOTE]
    interval = interval_note(outcome)
    if interval:
        out.append(interval)
    if any(r.joint for r in outcome.results):
        out.append(JOINT_NOTE)
    if outcome.interrupted:
        out.append(f"interrupted: {len(outcome.results)} of {outcome.planned} configurations finished")
    return out


def format_leaderboard(outcome: SweepOutcome, top: Optional[int] = None) -> str:
    """Plain text: the headline, a table best first (rank, head, params, val and test scores, seconds), notes."""
    header, rows = leaderboard_rows(outcome, top)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([headline(outcome), *lines, *notes(outcome)])


def format_markdown(outcome: SweepOutcome) -> str:
    header, rows = leaderboard_rows(outcome)
    lines = [f"# Sweep\n\n{headline(outcome)}\n", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes(outcome)) + "\n"


def sweep_summary(outcome: SweepOutcome, grid: Optional[dict] = None) -> dict:
    """What sweep.json holds: the grid, the notes, the winner and every result, best first."""
    w = outcome.winner
    return {"grid": grid, "has_test": outcome.has_test, "interrupted": outcome.interrupted,
            "planned": outcome.planned, "finished": len(outcome.results), "seconds": round(outcome.seconds, 3),
            "n_val": outcome.n_val, "n_test": outcome.n_test,
            "selection": "val", "notes": notes(outcome), "winner": w.to_dict() if w else None,
            "results": [dict(rank=i, **r.to_dict()) for i, r in enumerate(outcome.ranked(), 1)]}


def outcome_from_summary(summary: dict) -> SweepOutcome:
    """The SweepOutcome that sweep.json describes (results in their ranking order, without models): what
    plot_sweep and the leaderboards need. KeyError / TypeError / ValueError when a field is missing or malformed."""
    def number(v: Optional[float]) -> Optional[float]:
        return None if v is None else float(v)

    def result(i: int, r: dict) -> SweepResult:
        if r["head_type"] not in SWEEP_TYPES:
            raise ValueError(f"result {i + 1} has head type {r['head_type']!r} (known: {', '.join(SWEEP_TYPES)})")
        return SweepResult(SweepConfig(r["head_type"], tuple(r["params"].items())), float(r["val_acc"]),
                           float(r["val_mean_per_class"]), float(r["seconds"]), bool(r.get("joint")),
                           r.get("best_epoch"), number(r.get("test_acc")), number(r.get("test_mean_per_class")),
                           position=i)

    def count(v) -> Optional[int]:           # sweep.json files written before n_val / n_test: None
        return None if v is None else int(v)

    results = [result(i, r) for i, r in enumerate(summary["results"])]
    return SweepOutcome(results, bool(summary["has_test"]), bool(summary["interrupted"]), float(summary["seconds"]),
                        int(summary["planned"]), count(summary.get("n_val")), count(summary.get("n_test")))


def write_sweep_reports(outcome: SweepOutcome, out_dir: Path, grid: Optional[dict] = None,
                        plot: bool = True) -> list[Path]:
    """sweep.json, sweep.md and (plot=True) sweep.png in out_dir, each written whole or not at all."""
    out_dir = Path(out_dir)
    paths = [atomic_write_bytes(out_dir / SWEEP_JSON, (json.dumps(sweep_summary(outcome, grid), indent=2) + "\n").encode()),
             atomic_write_bytes(out_dir / SWEEP_MD, format_markdown(outcome).encode())]
    if plot and outcome.results:
        paths.append(plot_sweep(outcome, out_dir / SWEEP_PNG))
    return paths


# Fixed margins (inches) instead of tight_layout's extra draw: the label column is sized from its longest
# label at 8 pt (plots.text_width), the legend's column from its longest entry.
BARS_INCHES, TITLE_INCHES, AXIS_INCHES = 5.0, 0.45, 0.6
TEST_LABEL = "test top-1 (chosen models)"
TYPE_COLOURS = {"linear": "#1f77b4", "mlp": "#9467bd", "knn": "#2ca02c", "ncm": "#ff7f0e", "logistic": "#d62728"}


def plot_sweep(outcome: SweepOutcome, path: Path, top: int = 20) -> Path:
    """Horizontal bars of val top-1, best at the top, coloured by head type and labelled with their
    value: the best `top` plus the best of every head type, so each type is on the chart; the winner
    outlined, test top-1 marked where it was scored, and behind the bars the winner's 95% interval
    (winner_interval) when val's size is known."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    everything = outcome.ranked()
    keep = {id(r) for r in everything[:top]} | {id(r) for r in outcome.chosen()}
    ranked = [r for r in everything if id(r) in keep]
    labels = [f"#{i} {r.head_type} {r.config.label()}" for i, r in enumerate(everything, 1) if id(r) in keep]
    ys = np.arange(len(ranked))[::-1]
    tested = [(y, r.test_acc) for y, r in zip(ys, ranked) if r.test_acc is not None]
    label_w = 0.2 + max(text_width(t, 8) for t in labels)
    interval = winner_interval(outcome)
    interval_label = f"winner's 95% interval ({outcome.n_val} val images)"
    entries = list(SWEEP_TYPES) + ([TEST_LABEL] if tested else []) + ([interval_label] if interval else [])
    legend_w = 0.6 + max(text_width(t, 8) for t in entries)
    width, height = label_w + BARS_INCHES + legend_w, 1.2 + 0.28 * len(ranked)
    fig = Figure(figsize=(width, height))   # no pyplot: no global figure state, no GUI backend
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=label_w / width, right=1 - legend_w / width, top=1 - TITLE_INCHES / height,
                        bottom=AXIS_INCHES / height)
    ax = fig.subplots()
    accs = [r.val_acc for r in ranked]
    if interval is not None:   # behind the bars: the configurations it spans, val cannot rank reliably
        ax.axvspan(*interval, color="0.88", zorder=0, label=interval_label)
    ax.barh(ys, accs, color=[TYPE_COLOURS[r.head_type] for r in ranked],
            edgecolor=["black" if i == 0 else "none" for i in range(len(ranked))], linewidth=1.5)
    for y, acc in zip(ys, accs):
        ax.text(acc, y, f" {acc:.4f}", va="center", fontsize=7)
    if tested:
        ax.scatter([t for _, t in tested], [y for y, _ in tested], marker="D", color="black", zorder=3,
                   label=TEST_LABEL)
    ax.set_yticks(ys, labels, fontsize=8)
    low = min(accs + [t for _, t in tested] + ([interval[0]] if interval else []))
    high = max(accs + ([interval[1]] if interval else []))
    ax.set_xlim(max(0.0, low - 0.05), min(1.0, high + 0.03) if high < 0.97 else 1.0)
    ax.set_xlabel("val top-1" + ("" if outcome.has_test else " (also used for selection)"))
    shown = (f"best {min(top, len(everything))} of {len(everything)} and the best of each head type"
             if len(everything) > len(ranked) else f"{len(ranked)} configurations")
    ax.set_title(f"Sweep: {shown}, winner outlined", fontsize=10)
    handles = [Patch(color=TYPE_COLOURS[t], label=t) for t in SWEEP_TYPES if any(r.head_type == t for r in ranked)]
    extra = ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles + extra, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110, format="png", pil_kwargs=PNG)
    os.replace(tmp, path)
    return path
