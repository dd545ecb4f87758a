"""Typed configuration: one dataclass per params.json section, strictly validated.

The defaults are defined here, once; params.json is a readable copy of them (tests/test_config.py
keeps the two equal), so `--help` prints what `python run_pipeline.py` runs.

Every key has a type and, where it matters, a range or a list of choices. Unknown keys,
wrong types, NaN/Infinity, duplicate keys and out-of-range values are errors that name the key.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline import PipelineError  # noqa: F401
# The value helpers and bounds, and the sections of the head-training stages, are kept in their own
# modules (config.py stays under the layout's 400 lines); every name is re-exported from here.
from pipeline.config_fields import (MAX_BATCH, MAX_EPOCHS, MAX_LR, MAX_NAME, MAX_SEED, ConfigError, _c,  # noqa: F401
                                    check_tap_names)
from pipeline.config_heads import (DEFAULT_GRID, HEAD_TYPES, SWEEP_TYPES, HeadConfig,  # noqa: F401
                                   LeaderboardConfig, LogisticConfig, SweepStageConfig, check_grid, check_object)

TRAIN_STAGES = ("extract", "head", "logistic", "finetune")
# Stages whose results belong to one dataset (the run folder's data check, the results table).
DATA_STAGES = TRAIN_STAGES + ("sweep",)
# predict needs image paths from the command line, so it cannot be listed in run.stages.
RUN_STAGES = TRAIN_STAGES + ("sweep", "benchmark", "report", "leaderboard")
STAGES = RUN_STAGES + ("predict",)
PREDICT_MODELS = ("head", "logistic", "finetune")


# ----------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    name: Optional[str] = _c(None, "run folder under output_dir (<= 100 characters, '/' makes sub-folders, no absolute "
                             "path or '..'); null derives it from the data: demo (demo:flowers), demo-digits, else "
                             "<data folder name>-<8 hex of its real path> (features.file: the file's)", run_name=True)
    output_dir: str = _c("runs", "where run folders (metrics.json, models, plots) go", nonempty=True)
    device: str = _c("auto", "auto (cuda if present, else cpu), cpu, cuda, cuda:N or mps", nonempty=True)
    seed: int = _c(0, "seed for initialisation and shuffling (0 to 2^32-1)", ge=0, le=MAX_SEED)
    stages: list[str] = _c(list(TRAIN_STAGES), "stages run when none are named on the command line",
                           item_choices=RUN_STAGES)
    num_threads: int = _c(0, "torch intra-op threads (at most 1024); 0 sizes them to the stage: 1 for a linear, "
                          "knn or ncm head, logistic and leaderboard, every core the process may use (its affinity) otherwise "
                          "(sweep, an mlp head, extraction, ...)", ge=0, le=1024)
    trust_artifacts: bool = _c(False, "load model files whose SHA-256 is not recorded in the run folder "
                               "(--trust); joblib/pickle files can run code when loaded")
    reuse_memory: bool = _c(True, "keep freed memory for reuse (glibc malloc: no fresh mmap per large tensor, "
                            "no trimming; CPU extraction 1.8x faster here, a higher resident peak); false leaves "
                            "malloc as it is (pipeline/malloc.py)")
    dist_timeout_min: float = _c(60.0, "under torchrun: minutes a rank waits for rank 0's own work (scan, cache "
                                 "assembly, stages only rank 0 runs) before giving up", gt=0, le=10080)


@dataclass
class DataConfig:
    root: str = _c("demo:flowers", "ImageFolder root with train/, a val folder and optionally test/, or a demo: "
                   "demo:flowers (400 photos of 5 flowers, shipped) or demo:digits (1,797 8x8 digits)", nonempty=True)
    val_dir: Optional[str] = _c(None, "val folder name in data.root; null: val/, valid/, validation/", nonempty=True)
    val_fraction: Optional[float] = _c(None, "no val folder: split this share of train/ off by content", gt=0, lt=1)
    test_fraction: float = _c(0.0, "with val_fraction and no test/: split this share of train/ off as test", ge=0, lt=1)
    split_seed: int = _c(0, "seed of the content-hash split (val_fraction, test_fraction)", ge=0, le=MAX_SEED)
    num_workers: int = _c(1, "DataLoader worker processes for image decoding", ge=0, le=256)
    max_bad_fraction: float = _c(0.05, "unreadable image files tolerated (skipped, listed in bad_files.json) as a "
                                 "fraction of all image files; more aborts before extracting", ge=0, le=1)


@dataclass
class BackboneConfig:
    name: str = _c("efficientnet_lite0", "efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 (ImageNet "
                   "weights that ship offline; native 224 / 240 / 260 px), any torchvision classification model, "
                   "or timm/<model name> (e.g. timm/convnext_tiny.fb_in22k)", nonempty=True)
    weights: Optional[str] = _c("DEFAULT", "DEFAULT (the model's own pretrained weights), a torchvision weights "
                                "enum name, a local .pth / .bin / .safetensors state dict (its SHA-256 is in the "
                                "cache key), or none (random initialisation; null and \"None\" mean the same)",
                                nonempty=True)
    image_size: Optional[int] = _c(None, "input crop size (at most 1024); null keeps the backbone's native one "
                                   "(from its weights or pretrained config)", gt=0, le=1024)
    cut: str = _c("pool", "cached features: pool (input of the final classifier layer) or conv (the "
                  "flattened conv trunk after the adaptive pool; vgg*, alexnet)", choices=("pool", "conv"))
    taps: list[str] = _c(["pool"], "feature sets cached from one forward pass, each its own dataset: pool (always "
                         "stored), stage-1, stage-2, ... (pooled output of a stage, counted from the last), concat "
                         "(pool + the stage taps listed), cls and patch_mean (ViTs); in the cache key; see "
                         "docs/backbones.md", nonempty=True)

    def __post_init__(self) -> None:
        if self.weights is None or self.weights in ("None", "null"):
            self.weights = "none"  # torchvision's weights=None, as users type it
        check_tap_names(self.taps)

    def recorded(self) -> dict:
        """backbone.* as cache files record them: taps only when not the default (those files stay as they were)."""
        values = dataclasses.asdict(self)
        return {k: v for k, v in values.items() if k != "taps" or v != ["pool"]}


@dataclass
class ExtractConfig:
    batch_size: int = _c(64, "images per forward pass", gt=0, le=65536)
    cache_dir: str = _c("cache", "folder for the HDF5 feature files", nonempty=True)
    dtype: str = _c("float32", "storage dtype of cached features", choices=("float32", "float16"))
    autocast: str = _c("none", "mixed-precision forward passes of the frozen backbone (torch.autocast on the run's "
                       "device): none, float16 or bfloat16; pays on CUDA, and bfloat16 on a CPU with AMX (1.7x faster "
                       "extraction on a 2-core Xeon), not on other CPUs; part of the cache key",
                       choices=("none", "float16", "bfloat16"))
    chunk_size: int = _c(512, "images per saved chunk: an interrupted extraction redoes at most one chunk",
                         gt=0, le=MAX_BATCH)
    verify: str = _c("stat", "how unchanged images are recognised: stat (size, mtime, ctime, inode; "
                     "hash only files whose stat changed) or content (hash and decode every file, every run)",
                     choices=("stat", "content"))
    lock_timeout: Optional[float] = _c(None, "seconds to wait for another extraction of the same features; "
                                       "null waits until it ends, 0 exits at once", ge=0, le=604800)
    train_views: int = _c(0, "seeded augmented views (RandomResizedCrop + flip) stored per train image; "
                          "the head draws one per image per epoch; 0 = none", ge=0, le=100)
    views_seed: int = _c(0, "seed of the augmented views (part of their key)", ge=0, le=MAX_SEED)


@dataclass
class FeaturesConfig:
    file: Optional[str] = _c(None, "a cache file written by extract (cache/<data>.<backbone>-<key>.h5): head, logistic "
                             "and report train and predict from it alone, with no image opened and data.root and "
                             "backbone.* ignored; null uses data.root's cache (extracted first when missing or "
                             "stale)", nonempty=True)


@dataclass
class FinetuneConfig:
    epochs: int = _c(25, "training epochs", gt=0, le=MAX_EPOCHS)
    batch_size: int = _c(16, "images per SGD step", gt=0, le=65536)
    lr: float = _c(0.001, "SGD learning rate (at most 10)", gt=0, le=MAX_LR)
    momentum: float = _c(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _c(0.0, "SGD weight decay", ge=0, le=1)
    step_size: int = _c(7, "StepLR: epochs between decays", gt=0, le=MAX_EPOCHS)
    gamma: float = _c(0.1, "StepLR: decay factor", gt=0, le=1)
    augment: bool = _c(True, "RandomResizedCrop + horizontal flip on train images")
    init_head: str = _c("none", "none (a new classifier layer) or cached (start from the head stage's head.pt)",
                        choices=("none", "cached"))
    backbone_lr_mult: float = _c(1.0, "backbone learning rate = lr x this; the classifier keeps lr", gt=0, le=1)
    resume: bool = _c(False, "continue from finetune.best-so-far.pt, the best epoch an interrupted finetune kept "
                      "beside finetune.pt (same data, backbone and settings; epochs may grow); false starts over")
    autocast: str = _c("none", "mixed-precision training steps (torch.autocast on the run's device; float16 with a "
                       "gradient scaler): none, float16 or bfloat16; for CUDA (on a CPU with AMX bfloat16 made an "
                       "epoch 1.2x slower); val is scored in float32, as predict runs",
                       choices=("none", "float16", "bfloat16"))


@dataclass
class ReportConfig:
    enabled: bool = _c(True, "write plots and per-class reports after each training stage")
    grid_images: int = _c(16, "val images shown in the prediction grid", gt=0, le=64)


@dataclass
class PredictConfig:
    model: str = _c("head", "which saved model classifies: head, logistic or finetune", choices=PREDICT_MODELS)
    top_k: int = _c(3, "classes listed per image", gt=0, le=1000)
    batch_size: int = _c(32, "images per forward pass", gt=0, le=65536)


@dataclass
class BenchmarkConfig:
    backbones: list[str] = _c([], "backbones compared (names as in backbone.name; 'name@weights' gives one its own "
                              "backbone.weights, e.g. resnet18@none); empty means backbone.name")
    methods: list[str] = _c(list(PREDICT_MODELS), "methods compared on the same data and seed",
                            item_choices=PREDICT_MODELS, nonempty=True)
    finetune_epochs: Optional[int] = _c(None, "finetune epochs in the benchmark; null uses finetune.epochs",
                                        gt=0, le=MAX_EPOCHS)
    isolate: bool = _c(True, "run each step in its own process, so peak RSS is that step's own")
    timing_images: int = _c(256, "images timed for backbone throughput when the cache is reused", gt=0,
                            le=MAX_BATCH)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    logistic: LogisticConfig = field(default_factory=LogisticConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    sweep: SweepStageConfig = field(default_factory=SweepStageConfig)
    leaderboard: LeaderboardConfig = field(default_factory=LeaderboardConfig)

    @property
    def run_dir(self) -> Path:
        from pipeline.runname import data_run_name  # run.name null: derived from data.root
        return Path(self.run.output_dir) / (self.run.name or data_run_name(self.data.root))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


# ----------------------------------------------------------------------------- loading
def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed (use a finite number)")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key '{key}'")
        out[key] = value
    return out


def parse_json_text(text: str, source: str) -> Any:
    """Parse JSON strictly: no NaN/Infinity, no duplicate keys; errors name the line."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        before = text[:e.pos].rstrip()
        hint = " (a trailing comma?)" if before.endswith(",") and text[e.pos:e.pos + 1] in "}]" else ""
        raise ConfigError(f"{source}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from None
    except RecursionError:
        raise ConfigError(f"{source}: JSON nested too deeply (params are two levels: section, key)") from None
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def _check_run_name(key: str, value: str) -> None:
    """A run folder name stays inside run.output_dir and within file-name limits."""
    if len(value) > MAX_NAME:
        raise ConfigError(f"{key}: at most {MAX_NAME} characters, got {len(value)}")
    parts = value.replace("\\", "/").split("/")
    if value.startswith("/") or ".." in parts or any(not p.strip() for p in parts):
        raise ConfigError(f"{key}: '{value}' must be a relative folder name inside run.output_dir "
                          "(no leading '/', no '..', no empty parts)")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Return `value` converted to `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (tp,) = [a for a in typing.get_args(tp) if a is not type(None)]
        origin = typing.get_origin(tp)
    if tp is dict or origin is dict:
        return check_grid(key, value) if meta.get("grid") else check_object(key, value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{key}: must not be empty")
        items = [_check_value(f"{key}[{i}]", v, item_tp, {}) for i, v in enumerate(value)]
        allowed = meta.get("item_choices")
        for i, v in enumerate(items):
            if allowed is not None and v not in allowed:
                raise ConfigError(f"{key}[{i}]: '{v}' is not one of {', '.join(allowed)}")
            if "item_gt" in meta and not v > meta["item_gt"]:
                raise ConfigError(f"{key}[{i}]: must be > {meta['item_gt']}, got {v}")
            if "item_le" in meta and not v <= meta["item_le"]:
                raise ConfigError(f"{key}[{i}]: must be <= {meta['item_le']!r}, got {v}")
        return items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if meta.get("nonempty") and not value.strip():
            raise ConfigError(f"{key}: must not be empty")
        if meta.get("run_name"):
            _check_run_name(key, value)
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(meta['choices'])}")
    for op, test, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                           ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
        if op in meta and not test(value, meta[op]):
            raise ConfigError(f"{key}: must be {word} {meta[op]}, got {value}")
    return value


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected an object of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key '{name}.{unknown[0]}'{_did_you_mean(name, unknown[0], fields)} "
                          f"(known keys in '{name}': {', '.join(fields)})")
    values = {k: _check_value(f"{name}.{k}", v, hints[k], dict(fields[k].metadata))
              for k, v in raw.items()}
    return cls(**values)


def config_from_dict(raw: Any, source: str = "params") -> Config:
    """Build a validated Config from a nested dict (missing keys take their defaults)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be an object of sections")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section '{unknown[0]}'{did_you_mean(unknown[0], SECTIONS)} "
                          f"(known: {', '.join(SECTIONS)})")
    return Config(**{name: _build_section(name, cls, raw.get(name, {}))
                     for name, cls in SECTIONS.items()})


def did_you_mean(word: str, known, prefix: str = "") -> str:
    """" (did you mean 'prefix<closest>'?)" for the known name closest to a misspelt word, or ""."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _did_you_mean(section: str, key: str, known) -> str:
    return did_you_mean(key, known, f"{section}.")


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected section.key=value")
    dotted, value_text = text.split("=", 1)
    if dotted.count(".") != 1:
        raise ConfigError(f"--set '{text}': expected section.key=value (e.g. head.lr=0.01)")
    section, key = dotted.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"--set '{text}': unknown section '{section}'{did_you_mean(section, SECTIONS)} "
                          f"(known: {', '.join(SECTIONS)})")
    field_names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in field_names:
        raise ConfigError(f"unknown key '{section}.{key}'{_did_you_mean(section, key, field_names)} "
                          f"(known keys in '{section}': {', '.join(field_names)})")
    tp = typing.get_type_hints(SECTIONS[section])[key]
    try:
        value = parse_json_text(value_text, f"--set {dotted}")
    except ConfigError:
        value = value_text  # a bare word such as resnet18 or /data/ants
    if (tp is str or tp == Optional[str] and value is not None) and not isinstance(value, str):
        value = value_text  # run.name=123 means the string "123"
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load params JSON (or the defaults when path is None) and apply section.key=value overrides."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read params file '{path}': {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"cannot read params file '{path}': not UTF-8 text (byte {e.start}); "
                              "save it as UTF-8") from None
        raw = parse_json_text(text, str(path))
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be an object of sections")
    raw = copy.deepcopy(raw)
    for text in overrides:
        section, key, value = _parse_override(text)
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{section}: expected an object of keys")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, str(path) if path else "params")


def describe_keys() -> str:
    """One line per key: name, default and help, for --help."""
    lines = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            lines.append(f"  {name}.{f.name} (default {json.dumps(default)}): {f.metadata['help']}")
    return "\n".join(lines)
