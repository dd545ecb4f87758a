"""Stage `sweep`: every configuration of sweep.grid trained from one read of the cache; the winner is the head.

    python run_pipeline.py sweep
    python run_pipeline.py sweep --set 'sweep.grid={"linear": {"lr": [0.001, 0.01]}, "knn": {"k": [10, 20]}}'

The grid is expanded and checked before any feature is read (pipeline.sweep.expand_grid); a
parameter a configuration leaves out takes its head.* value (logistic: logistic.max_iter). The
linear heads of the grid train jointly (pipeline.joint). Selection is on val only; a `test` split in
the cache, when there is one, is scored once for the chosen models and is then the headline figure.

One unit is published in the run folder (pipeline/rundir.py): the winner as head.pt (an nn.Linear
for linear and logistic winners, a probe's state for mlp / knn / ncm), its metrics entry (under
`head`, source "sweep"), reports, head_val_predictions.csv, and sweep.json / sweep.md / sweep.png
(sweep.png, like the reports, only with report.enabled; `report` draws it later from sweep.json);
then every finished configuration is appended to the ledger. Ctrl-C keeps what finished: those
configurations are published and recorded, and the stage says how many of the grid finished.
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.artifacts import MODEL_FILES
from pipeline.cache import CacheError
from pipeline.config import Config
from pipeline.head_outputs import (compact_params, confused_text, head_values, ledger_entry, record_heads,
                                   stage_error_analysis, test_split)
from pipeline.logistic_worker import fold
from pipeline.orchestrate import StageFeatures, stage_features
from pipeline.probes import CONFIGS
from pipeline.records import ModelArtifact, StageResult
from pipeline.report import Predictions, finish_stage
from pipeline.rundir import Publication
from pipeline.runtime import environment_info
from pipeline.stream import float32_nbytes, needs_streaming, stream_message
from pipeline.sweep import (LOGISTIC_DEFAULTS, SWEEP_JSON, SWEEP_PNG, SWEEP_TYPES, SweepConfig, SweepOutcome,
                            SweepResult, expand_grid, full_params)
from pipeline.sweep import run_sweep as sweep_heads
from pipeline.sweep_report import format_leaderboard, write_sweep_reports

HEAD_FILE = MODEL_FILES["head"]


def sweep_defaults(cfg: Config) -> dict:
    """{head type: values for the parameters a grid entry leaves out}: head.* (logistic: logistic.max_iter)."""
    out = {t: head_values(cfg.head, t) for t in SWEEP_TYPES if t != "logistic"}
    out["logistic"] = {"max_iter": cfg.logistic.max_iter}
    return out


def ledger_params(result: SweepResult, defaults: dict) -> dict:
    """A configuration's parameters that differ from its type's own defaults (C always shown)."""
    params = full_params(result.config, defaults)
    own = LOGISTIC_DEFAULTS if result.head_type == "logistic" else dataclasses.asdict(CONFIGS[result.head_type]())
    return compact_params(params, own, keep=("C",))


def _linear_state(folded: tuple[np.ndarray, np.ndarray]) -> dict:
    """(weight, bias) arrays as an nn.Linear state dict (copies: the arrays stay the model's)."""
    weight, bias = folded
    return {"weight": torch.from_numpy(weight.copy()), "bias": torch.from_numpy(bias.copy())}


def fold_logistic(model, num_classes: int) -> dict:
    """StandardScaler + LogisticRegression as one nn.Linear state dict with the same probabilities
    (pipeline.logistic_worker.fold)."""
    return _linear_state(fold(model, num_classes))


def winner_weights(winner: SweepResult, num_classes: int) -> tuple[str, dict]:
    """(head_type recorded in head.pt, its state_dict): what predictor.py rebuilds."""
    if winner.head_type == "linear":
        return "linear", {k: v.detach().cpu().clone() for k, v in winner.model.model.state_dict().items()}
    if winner.head_type == "logistic":
        return "logistic", _linear_state(winner.model.folded())    # the child's fold when it fitted the C path
    return winner.head_type, winner.model.state()


def run_sweep(cfg: Config, device: torch.device) -> dict:
    """Stage `sweep`: train sweep.grid on the cache from stage_features, publish the winner as the head."""
    t0 = time.perf_counter()
    configs = expand_grid(cfg.sweep.grid)  # a bad grid stops here, before any extraction
    inputs = stage_features(cfg, device)
    shapes = inputs.features.shapes()
    if needs_streaming(shapes, cfg.head.max_memory_gb):
        raise PipelineError(stream_message("sweep", float32_nbytes(shapes), cfg.head.max_memory_gb,
                                           "a sweep keeps the features in memory: raise head.max_memory_gb, or "
                                           "train one linear head with the head stage (streamed)"))
    defaults = sweep_defaults(cfg)
    outcome, features = _sweep_taps(cfg, device, inputs, configs, defaults)
    if not outcome.results:
        raise KeyboardInterrupt("sweep: interrupted before any configuration finished; nothing was written")
    entry = _publish(cfg, device, inputs, features, outcome, defaults, t0)
    print(format_leaderboard(outcome, top=cfg.sweep.top))
    record_heads(cfg.run.output_dir, [ledger_entry(inputs.features, r.head_type, ledger_params(r, defaults),
                                                   r.val_acc, r.val_mean_per_class,
                                                   {"test_acc": r.test_acc, "test_mean_per_class": r.test_mean_per_class},
                                                   r.seconds, cfg.run_dir, "sweep") for r in outcome.ranked()])
    if outcome.interrupted:
        raise KeyboardInterrupt(f"sweep: interrupted: {len(outcome.results)} of {outcome.planned} configurations "
                                f"finished; their results are in {cfg.run_dir / SWEEP_JSON}, the best of them in "
                                f"{cfg.run_dir / HEAD_FILE}")
    return entry


def _sweep_one(cfg: Config, device: torch.device, inputs: StageFeatures, configs: list, defaults: dict):
    """(outcome, features in memory) of the grid on inputs' current tap."""
    features = inputs.load()
    test = test_split(features)
    tap = "" if inputs.features.tap == "pool" and not cfg.sweep.taps else f" (tap {inputs.features.tap})"
    print(f"sweep: {len(configs)} configurations on {inputs.features.path}{tap} ({len(features.train.labels)} train, "
          f"{len(features.val.labels)} val" + (f", {len(test.labels)} test" if test is not None else "") + " rows)")
    outcome = sweep_heads(configs, features.train.features, features.train.labels, features.val.features,
                          features.val.labels, None if test is None else test.features,
                          None if test is None else test.labels, num_classes=len(features.classes),
                          seed=cfg.run.seed, device=device, progress=sys.stderr.isatty(), defaults=defaults)
    return outcome, features


def _sweep_taps(cfg: Config, device: torch.device, inputs: StageFeatures, configs: list, defaults: dict):
    """The grid on head.tap, or on each of sweep.taps in turn: every result's params then start with its tap
    (the leaderboard shows it; the winner's head.pt records it). inputs is left on the winner's tap."""
    if not cfg.sweep.taps:
        return _sweep_one(cfg, device, inputs, configs, defaults)
    base, taps = inputs.features, list(dict.fromkeys(cfg.sweep.taps))
    for tap in taps:  # every tap cached, before any training
        try:
            base.with_tap(tap)
        except CacheError as e:
            raise CacheError(str(e).replace("head.tap", "sweep.taps")) from None
    results, loaded, runs = [], {}, []
    for i, tap in enumerate(taps):
        inputs.features = base.with_tap(tap)
        run, loaded[tap] = _sweep_one(cfg, device, inputs, configs, defaults)
        runs.append(run)
        results += [dataclasses.replace(r, config=SweepConfig(r.head_type, (("tap", tap),) + r.config.params),
                                        position=i * run.planned + r.position) for r in run.results]
        if run.interrupted:
            break
    outcome = SweepOutcome(results, any(r.has_test for r in runs), runs[-1].interrupted,
                           sum(r.seconds for r in runs), len(configs) * len(taps), runs[0].n_val, runs[0].n_test)
    winner = outcome.winner.config.param_dict["tap"] if results else taps[0]
    inputs.features = base.with_tap(winner)
    return outcome, loaded[winner]


def _artifact(cfg: Config, device: torch.device, inputs: StageFeatures, features, winner: SweepResult,
              defaults: dict) -> tuple[dict, list]:
    head_type, weights = winner_weights(winner, len(features.classes))
    history = list(getattr(getattr(winner.model, "result", None), "history", None) or [])
    params = full_params(winner.config, defaults)
    head_config = {**dataclasses.asdict(cfg.head), **{k: v for k, v in params.items() if hasattr(cfg.head, k)},
                   "type": head_type}
    artifact = ModelArtifact(
        "head", list(features.classes), weights, head_config, inputs.features.backbone, inputs.backbone_config,
        inputs.seed, inputs.data_root, features.feature_dim, inputs.features.key, str(inputs.features.path),
        history, environment_info(device),
        {"head_type": head_type, "best_epoch": winner.best_epoch, "val_acc": winner.val_acc, "streamed": False,
         "sweep_winner": {"head_type": winner.head_type, "params": params}}).to_dict()
    return artifact, history


def _publish(cfg: Config, device: torch.device, inputs: StageFeatures, features, outcome: SweepOutcome,
             defaults: dict, t0: float) -> dict:
    """Stage head.pt (the winner), its reports and val predictions, sweep.json/md/png; publish as one unit."""
    winner = outcome.winner
    artifact, history = _artifact(cfg, device, inputs, features, winner, defaults)
    probs = np.asarray(winner.model.predict_proba(features.val.features), dtype=np.float64)
    preds = Predictions(probs, features.val.labels, features.val.paths, inputs.images, list(features.classes))
    with Publication(cfg.run_dir, "head") as pub:
        pub.save_model(HEAD_FILE, lambda tmp: torch.save(artifact, tmp))
        files = write_sweep_reports(outcome, pub.staging, cfg.sweep.grid, plot=cfg.report.enabled)
        if not cfg.report.enabled and (cfg.run_dir / SWEEP_PNG).exists():
            pub.remove.append(SWEEP_PNG)      # an earlier sweep's chart; `report` draws this one's
        entry = StageResult("head", winner.val_acc, inputs.elapsed(t0), str(cfg.run_dir / HEAD_FILE), history,
                            _details(cfg, outcome, winner, defaults, [pub.final_path(p) for p in files])).to_dict()
        entry.update(finish_stage(cfg.report, "head", preds, artifact, pub, history=history))
        entry.update(stage_error_analysis(pub, "head", preds))
        entry["leaked_images"] = inputs.leaked_images  # warned once per run, counted by every stage
        pub.commit(metrics_entry=entry, config=cfg.to_dict())
    print(f"sweep: winner {winner.head_type} {winner.config.label()} saved as {cfg.run_dir / HEAD_FILE} (predict and "
          f"report use it); {confused_text(entry['confused_pairs'])}")
    return entry


def _details(cfg: Config, outcome: SweepOutcome, winner: SweepResult, defaults: dict, files: list) -> dict:
    params = full_params(winner.config, defaults)
    trained = {"best_epoch": winner.best_epoch, "epochs": params["epochs"]} if winner.best_epoch is not None else {}
    test = ({"test_acc": winner.test_acc, "test_mean_per_class": winner.test_mean_per_class}
            if outcome.has_test else {})
    return {"source": "sweep", "head_type": winner.head_type, "params": params, **trained,
            "selected_on": "val (the sweep's winner)",
            "val_mean_per_class": winner.val_mean_per_class, **test,
            "sweep": {"planned": outcome.planned, "finished": len(outcome.results), "interrupted": outcome.interrupted,
                      "has_test": outcome.has_test, "selection": "val", "seconds": outcome.seconds,
                      "winner": winner.config.label(),  # the grid's values of the winner (results table)
                      "files": [str(p) for p in files]}}
