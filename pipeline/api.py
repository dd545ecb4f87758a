"""The Python API: cached features, heads as scikit-learn estimators, saved models, from a notebook.

    from pipeline import api
    fs = api.load_features("hymenoptera_data")          # extracts once (the CLI's cache), then reads it
    api.fit(LogisticRegression(max_iter=1000), fs)      # {"val": {"acc", "mean_per_class", "n"}, ...}
    api.fit(api.KNNHead(k=10), fs)                      # the heads: LinearHead, MLPHead, KNNHead, NCMHead
    model = api.load_model(fs.run_dir, "head")          # a model a training stage saved, backbone included
    model.predict(["a.jpg", "folder/"])                 # rows: path, label, probability, top, error

Everything goes through the modules the CLI uses: `load_features` is the head stage's
`orchestrate.stage_features` (same cache file, freshness check, locks, damage recovery, run folder),
`load_model` is `predict`'s `predictor.load_predictor`. Importing this module imports neither torch nor
scikit-learn (the estimators are loaded on first use), and nothing here prints unless `verbose=True`:
what the CLI would have printed is kept in `FeatureSet.log`.

The ledger rule: `fit(estimator, fs)` on a FeatureSet that came from a cache (load_features) appends
one line to `output_dir/ledger.jsonl` (source "api"), as the CLI's head stage does, so the
`leaderboard` stage lists it; an estimator fitted on plain arrays (estimator.fit(X, y), GridSearchCV
on fs.train.X) has no cache and is not logged; `fit(..., ledger=False)` logs nothing.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

ESTIMATORS = ("LinearHead", "MLPHead", "KNNHead", "NCMHead", "make_estimator")
__all__ = ["FeatureSet", "FeatureSplit", "Model", "load_features", "fit", "score", "load_model", *ESTIMATORS]


def __getattr__(name: str) -> Any:
    """api.LinearHead and friends: pipeline.estimators, imported (with scikit-learn and torch) on first use."""
    if name in ESTIMATORS:
        from pipeline import estimators

        return getattr(estimators, name)
    raise AttributeError(f"module 'pipeline.api' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(ESTIMATORS))


@contextlib.contextmanager
def _output(verbose: bool) -> Iterator[io.StringIO]:
    """Collect what the stages print (messages, progress bars) instead of showing it, unless verbose."""
    buffer = io.StringIO()
    if verbose:
        yield buffer
        return
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


def _log_text(buffer: io.StringIO) -> str:
    """The collected output without progress-bar redraws (the last state of each bar line is kept)."""
    lines = (line.rsplit("\r", 1)[-1] for line in buffer.getvalue().split("\n"))  # a bar redraws after '\r'
    return "\n".join(line for line in lines if line.strip())


# ----------------------------------------------------------------------------- features
@dataclass
class FeatureSplit:
    """One split's cached rows, aligned: row i of X is the image paths[i], of class classes[y[i]]."""

    X: np.ndarray          # (n_samples, feature_dim) float32
    y: np.ndarray          # (n_samples,) int64 class indices into FeatureSet.classes
    paths: list[str]       # relative to FeatureSet.data_root

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class FeatureSet:
    """A verified cache file read into memory: `train`, `val` (and `test` when the cache has one)."""

    classes: list[str]
    train: FeatureSplit
    val: FeatureSplit
    test: Optional[FeatureSplit]
    path: Path                          # the cache file (give it to load_features again, or as features.file)
    backbone: dict                      # the backbone spec the features came from: name, weights, cut, preprocess
    data_root: str                      # the images' folder, as recorded at extraction
    run_dir: Path                       # the run folder the CLI uses for this data (models, metrics.json)
    extract: Optional[dict] = None      # the extract stage's metrics entry (None when read from a cache file)
    log: str = field(default="", repr=False)  # what the CLI would have printed
    key: str = ""                       # the cache's key ("": not from a cache; `fit` then keeps no ledger line)
    output_dir: Optional[Path] = None   # run.output_dir, whose ledger.jsonl `fit` appends to (None: no ledger)

    @property
    def tap(self) -> str:
        """The feature set X holds (backbone.taps' name; the ledger records a tap other than pool)."""
        return self.backbone.get("tap", "pool")

    @property
    def feature_dim(self) -> int:
        return int(self.train.X.shape[1])

    @property
    def splits(self) -> dict[str, FeatureSplit]:
        return {name: s for name, s in (("train", self.train), ("val", self.val), ("test", self.test)) if s is not None}


def _config(source: str, from_file: bool, backbone: str, params: Optional[dict], **values: Any):
    """A validated Config, as the CLI would build it from `--set` keys (params: more sections, merged last)."""
    from pipeline.config import config_from_dict

    raw: dict = {"data": {"root": "demo:flowers" if from_file else source, "num_workers": values["num_workers"]},
                 "backbone": {"name": backbone, "weights": values["weights"], "image_size": values["image_size"],
                              "cut": values["cut"], "taps": list(values["taps"] or ["pool", values["tap"]])},
                 "head": {"tap": values["tap"]},
                 "extract": {"cache_dir": str(values["cache_dir"]), "dtype": values["dtype"],
                             "batch_size": values["batch_size"]},
                 "features": {"file": source if from_file else None},
                 "run": {"output_dir": str(values["output_dir"]), "name": values["run_name"],
                         "device": values["device"], "seed": values["seed"]}}
    for section, keys in (params or {}).items():
        raw.setdefault(section, {}).update(keys)
    return config_from_dict(raw, "api.load_features")


def _split(cached) -> FeatureSplit:
    return FeatureSplit(np.asarray(cached.features, dtype=np.float32), np.asarray(cached.labels, dtype=np.int64),
                        list(cached.paths))


def load_features(source: str | Path, backbone: str = "efficientnet_lite0", *, weights: str = "DEFAULT",
                  image_size: Optional[int] = None, cut: str = "pool", dtype: str = "float32",
                  cache_dir: str | Path = "cache", output_dir: str | Path = "runs", run_name: Optional[str] = None,
                  device: str = "auto", seed: int = 0, batch_size: int = 64, num_workers: int = 0,
                  taps: Optional[Sequence[str]] = None, tap: str = "pool", params: Optional[dict] = None,
                  verbose: bool = False) -> FeatureSet:
    """The features of an ImageFolder (extracted first when the cache is missing or stale) or of a cache file.

    source : a data root (folder with train/ and val/, or demo:flowers / demo:digits), or a cache file
        written by extract (then the backbone arguments are ignored: the file says what it holds).
    The keyword arguments are the params keys of the same names (backbone.weights, backbone.image_size,
    extract.cache_dir, run.output_dir, run.name, ...); params: any other keys, as {"section": {"key": v}}.
    tap : the cached feature set X holds (head.tap: pool, stage-2, concat, cls, ...); taps: backbone.taps
        to extract (default: pool and tap). fs.backbone then records the tap.
    Raises PipelineError (one line naming the key or file and the fix) for anything a user can fix.
    """
    from pipeline import orchestrate
    from pipeline.rundir import check_same_data, run_lock
    from pipeline.runname import resolve_run_name
    from pipeline.runtime import resolve_device

    source = str(source)
    from_file = Path(source).is_file()
    cfg = _config(source, from_file, backbone, params, weights=weights, image_size=image_size, cut=cut,
                  dtype=dtype, cache_dir=cache_dir, output_dir=output_dir, run_name=run_name, device=device,
                  seed=seed, batch_size=batch_size, num_workers=num_workers, taps=taps, tap=tap)
    with _output(verbose) as out:
        resolve_run_name(cfg)
        if from_file:
            inputs = orchestrate.stage_features(cfg, None)
        else:
            if cfg.run.reuse_memory:  # as the CLI does: the backbone's large tensors reuse freed memory
                from pipeline.malloc import reuse_freed_memory
                reuse_freed_memory()
            with run_lock(cfg.run_dir):  # as the CLI's extract: one process at a time in a run folder
                check_same_data(cfg.run_dir, cfg.data.root)
                inputs = orchestrate.stage_features(cfg, resolve_device(cfg.run.device))
        cache = inputs.load()
    splits = cache.splits
    return FeatureSet(list(cache.classes), _split(splits["train"]), _split(splits["val"]),
                      _split(splits["test"]) if "test" in splits else None, Path(cache.path),
                      dict(inputs.features.backbone), inputs.data_root, cfg.run_dir, inputs.extract_entry,
                      _log_text(out), key=inputs.features.key, output_dir=Path(cfg.run.output_dir))


# ----------------------------------------------------------------------------- heads
def score(estimator, split: FeatureSplit) -> dict:
    """Top-1 and mean per-class accuracy of a fitted estimator on a split: {"acc", "mean_per_class", "n"}."""
    from pipeline.analysis import score_labels

    return score_labels(split.y, np.asarray(estimator.predict(split.X)))


def fit(estimator, fs: FeatureSet, ledger: bool = True) -> dict:
    """Fit any scikit-learn classifier (or one of the heads) on fs.train and score it on val (and test).

    The heads (LinearHead, MLPHead) keep their best val epoch, as the head stage does; the result then
    says `"selected_on": "val"`, since that val figure was also used for selection. Returns
    {"val": {"acc", "mean_per_class", "n"}, "test": {...} (when fs has test), "seconds", "selected_on",
    "ledger"}; the estimator is fitted in place.

    The ledger: when fs came from a cache (load_features: fs.key and fs.output_dir are set) and ledger is
    True, one line is appended to fs.output_dir/ledger.jsonl, as the CLI's head stage does (source "api");
    "ledger" is its path, or None (fs built from plain arrays, or ledger=False). An estimator fitted on
    arrays directly (estimator.fit(X, y)) has no cache and is never logged. A ledger that cannot be written
    is "ledger_error" in the result (the estimator is fitted); nothing is printed.
    """
    from pipeline.estimators import ProbeClassifier

    t0 = time.perf_counter()
    uses_val = isinstance(estimator, ProbeClassifier) and estimator.head_type in ("linear", "mlp")
    if uses_val:
        estimator.fit(fs.train.X, fs.train.y, fs.val.X, fs.val.y)
    else:
        estimator.fit(fs.train.X, fs.train.y)
    seconds = time.perf_counter() - t0
    out = {"val": score(estimator, fs.val)}
    if fs.test is not None:
        out["test"] = score(estimator, fs.test)
    out = {**out, "seconds": seconds, "selected_on": "val" if uses_val else None}
    return {**out, **(_record(estimator, fs, out) if ledger else {"ledger": None})}


def _head_params(estimator) -> tuple[str, dict]:
    """(head type, the parameters that differ from its defaults) of a fitted estimator, for the ledger."""
    from pipeline.estimators import ProbeClassifier
    from pipeline.head_outputs import compact_params

    params = estimator.get_params(deep=False)
    try:
        defaults = type(estimator)().get_params(deep=False)
    except TypeError:                   # an estimator with required arguments (a Pipeline): keep them all
        defaults = {}
    kind = estimator.head_type if isinstance(estimator, ProbeClassifier) else type(estimator).__name__
    differ = compact_params({k: v for k, v in params.items() if k not in ("verbose", "device")}, defaults)
    return kind, {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v) for k, v in differ.items()}


def _record(estimator, fs: FeatureSet, result: dict) -> dict:
    """Append the fitted head to fs.output_dir's ledger when fs came from a cache; {"ledger": path or None}."""
    if not fs.key or fs.output_dir is None:
        return {"ledger": None}
    from pipeline.head_outputs import append_heads, ledger_entry, ledger_path

    kind, params = _head_params(estimator)
    test = {"test_acc": result["test"]["acc"], "test_mean_per_class": result["test"]["mean_per_class"]} \
        if "test" in result else {}
    entry = ledger_entry(fs, kind, params, result["val"]["acc"], result["val"]["mean_per_class"], test,
                         result["seconds"], fs.run_dir, "api", n_val=result["val"]["n"])
    problem = append_heads(fs.output_dir, [entry])
    if problem:
        return {"ledger": None, "ledger_error": problem}
    return {"ledger": str(ledger_path(fs.output_dir))}


# ----------------------------------------------------------------------------- saved models
@dataclass
class Model:
    """A model a training stage saved (head, logistic or finetune), rebuilt with its backbone."""

    kind: str
    run_dir: Path
    predictor: Any = field(repr=False)  # pipeline.predictor.Predictor
    batch_size: int = 32
    top_k: int = 3
    num_workers: int = 0
    verbose: bool = False
    notes: list[str] = field(default_factory=list, repr=False)  # from the last predict: unknown class folders

    @property
    def classes(self) -> list[str]:
        return list(self.predictor.classes)

    def predict(self, paths: str | Path | Sequence[str | Path]) -> list:
        """One row per image (files as given, folders searched recursively), in order; a file named again
        (by a folder holding it, or a folder given twice) is not repeated (self.notes says so).

        Each row (pipeline.predict.ImagePrediction) has path, label, probability, top (the top_k
        (class, probability) pairs), error (None, or why the file could not be read) and true (its
        class folder, in a labelled folder: folder/<class>/...).
        """
        from pipeline.predict import predict_paths

        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        with _output(self.verbose):
            rows, self.notes = predict_paths(self.predictor, [str(p) for p in paths], self.batch_size,
                                             self.top_k, self.num_workers)
        return rows

    def evaluate(self, folder: str | Path) -> dict:
        """Scores on a labelled folder (folder/<class>/*.jpg with the model's classes): {"acc",
        "mean_per_class", "n", "confused_pairs": [(true, predicted, count), ...], "unscored": lines}."""
        from pipeline import PipelineError
        from pipeline.predict import labelled_scores

        scores = labelled_scores(self.predict(folder), self.classes)
        if scores is None:
            raise PipelineError(f"'{folder}' has no readable images in folders named after the model's classes "
                                f"({', '.join(self.classes)}): expected {folder}/<class>/*.jpg")
        s, pairs = scores
        return {**s, "confused_pairs": [(p.true, p.predicted, p.count) for p in pairs], "unscored": list(self.notes)}

    def predict_features(self, X: np.ndarray) -> np.ndarray:
        """(n_samples, num_classes) probabilities from cached features (head and logistic models)."""
        return self.predictor.probs_from_features(X)


def load_model(run_dir: str | Path, kind: str = "head", *, device: str = "auto", trust: bool = False,
               batch_size: int = 32, top_k: int = 3, num_workers: int = 0, verbose: bool = False) -> Model:
    """The model stage `kind` saved in run_dir, checked against SHA256SUMS (trust=True: as --trust)."""
    from pipeline.predictor import load_predictor
    from pipeline.runtime import resolve_device

    with _output(verbose):
        predictor = load_predictor(Path(run_dir), kind, resolve_device(device), trust=trust)
    return Model(kind, Path(run_dir), predictor, batch_size, top_k, num_workers, verbose)
