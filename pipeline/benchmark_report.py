"""The benchmark's outputs: benchmark.json, the markdown table and notes (benchmark.md), the chart (benchmark.png)."""
from __future__ import annotations

from pathlib import Path

from pipeline.metrics import HEADLINE, also_selected, write_json

BENCHMARK_JSON, BENCHMARK_MD, BENCHMARK_PNG = "benchmark.json", "benchmark.md", "benchmark.png"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


TEST_COLUMNS = (("test_acc", "test top-1"), ("test_mean_per_class", "test mean per-class"))  # the headline, if any
COLUMNS = (("backbone", "backbone"), ("method", "method"), ("val_acc", "val top-1"),
           ("mean_per_class_acc", "mean per-class"), ("extract_seconds", "extract s"), ("fit_seconds", "fit s"),
           ("finetune_seconds_per_epoch", "finetune s/epoch"), ("finetune_seconds", "finetune s"),
           ("total_seconds", "total s"), ("images_per_second", "images/s"), ("peak_rss_mib", "peak RSS MiB"),
           ("peak_gpu_mib", "peak GPU MiB"), ("break_even_runs", "break-even runs"))


def _cell(key: str, v) -> str:
    if v is None:
        return "–"
    if key in ("val_acc", "mean_per_class_acc", "test_acc", "test_mean_per_class"):
        return f"{v:.4f}"
    if isinstance(v, float):
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"
    return str(v)


def tested(rows: list[dict]) -> bool:
    """Whether any method was scored on a test split: then test leads the table and the chart."""
    return any(r.get("test_acc") is not None for r in rows)


def columns(rows: list[dict]) -> tuple:
    """COLUMNS, with the test columns as the first scores when a test split was scored."""
    return COLUMNS[:2] + (TEST_COLUMNS if tested(rows) else ()) + COLUMNS[2:]


def selection_text(rows: list[dict]) -> str:
    """The table's note on its figures, in the wording of every table (metrics.also_selected)."""
    if tested(rows):
        return f"{HEADLINE}; val top-1 is shown beside it."
    chose = [r["method"] for r in rows if str(r.get("selected_on") or "").startswith("val")]
    return (also_selected(f"val top-1 of {', '.join(chose)} was") + ".") if chose else ""


def markdown_table(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(title for _, title in cols) + " |",
             "|" + "|".join("---" if k in ("backbone", "method") else "--:" for k, _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(k, r.get(k)) for k, _ in cols) + " |" for r in rows]
    return "\n".join(lines)


def break_even_text(backbone: str, be: dict) -> str:
    runs = be["break_even_runs"]
    verdict = (f"pays for itself after {plural(runs, 'head run')}" if runs is not None
               else "never pays for itself (a cached run is not faster)")
    return (f"{backbone}: the one-time extraction ({be['extract_seconds']:.1f} s, "
            f"{be['extraction_in_loop_epochs']:.2f} epochs of the loop) {verdict}: a {be['head_epochs']}-epoch head "
            f"run takes {be['head_seconds_per_run']:.2f} s from the cache vs {be['loop_seconds_per_run']:.1f} s in a "
            f"feature-extractor loop that recomputes the backbone over train+val every epoch "
            f"({be['backbone_pass_seconds']:.1f} s per pass, from {be['throughput_source']}).")


def markdown_report(result: dict) -> str:
    env, data = result["environment"], result["data"]
    lines = ["# Benchmark: cached-feature heads vs finetuning", "",
             f"Data `{data['root']}`: {data['n_train']} train / {data['n_val']} val images, "
             f"{len(data['classes'])} classes, {data['image_size']} px; seed {result['seed']}.  ",
             f"torch {env['torch']}, torchvision {env['torchvision']}, device {env['device']}"
             + (f" ({env['gpu']})" if env.get("gpu") else "")
             + f", {env['num_threads']} threads; {result['created']}.  ",
             f"Finetuning: {plural(result['finetune_epochs'], 'epoch')}"
             + (f" (fewer than finetune.epochs={result['configured_finetune_epochs']}, to keep the benchmark short)"
                if result["finetune_epochs"] != result["configured_finetune_epochs"] else "") + ".", "",
             markdown_table(result["rows"]), ""]
    note = selection_text(result["rows"])
    lines += [note, ""] if note else []
    lines += [f"- {break_even_text(b['backbone'], b['break_even'])}" for b in result["backbones"] if b["break_even"]]
    lines += [f"- {b['backbone']}: extraction cost {b['steps']['extract']['source']}."
              for b in result["backbones"] if "extract" in b["steps"]]
    lines += [f"- **{e['backbone']} failed**: {e['error']}" for e in result["errors"]]
    lines += ["", "Columns: *fit s* is the head's SGD loop or the logistic grid search (cross-validation and "
              "refit); *total s* adds, for cached methods, the one-time extraction and the loading of the cache; "
              "*finetune s* is the training loop with a val pass per epoch; *images/s* is the extraction's "
              "(decoding included) or finetuning's training throughput.",
              f"Peak RSS: {result['memory_note']} Peak GPU: torch.cuda.max_memory_allocated, on CUDA only.",
              *([f"Each step's process held {result['baseline_rss_mib']:.0f} MiB before the step began "
                 "(interpreter, torch and this package)."] if result.get("baseline_rss_mib") else []),
              "Seconds exclude starting a process and importing torch."]
    return "\n".join(lines) + "\n"


def memory_note(isolate: bool) -> str:
    if isolate:
        return ("ru_maxrss of the process that ran the step alone (spawned fresh, so it includes the Python, "
                "torch and library runtime loaded by that step). DataLoader workers are separate processes and "
                "not included; benchmark.json's peak_rss_children_mib is the largest child's ru_maxrss, which "
                "counts the pages a forked worker shares with the step's process, so it overstates their own use.")
    return ("ru_maxrss of the one process that ran every step in turn (benchmark.isolate=false): "
            "a running high-water mark, so a later step's figure can be an earlier step's peak.")


def write_outputs(run_dir: Path, result: dict) -> list[Path]:
    from pipeline.plots import plot_benchmark

    run_dir = Path(run_dir)
    write_json(run_dir / BENCHMARK_JSON, result)
    (run_dir / BENCHMARK_MD).write_text(markdown_report(result), encoding="utf-8")
    written = [run_dir / BENCHMARK_JSON, run_dir / BENCHMARK_MD]
    chart_rows = [r for r in result["rows"] if not r["method"].startswith("extract")]
    if chart_rows:
        env = result["environment"]
        note = selection_text(result["rows"])
        written.append(plot_benchmark(chart_rows, run_dir / BENCHMARK_PNG,
                                      f"{result['data']['root']}: cached-feature heads vs finetuning",
                                      f"torch {env['torch']} on {env['device']}, {env['num_threads']} threads; "
                                      f"bars of cached methods include the one-time extraction"
                                      + (f"\n{note}" if note else ""), "test" if tested(chart_rows) else "val"))
    return written
