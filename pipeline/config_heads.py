"""The config sections of the stages that train heads on cached features: head, logistic, sweep, leaderboard.

Re-exported by pipeline.config (the one place the sections are assembled); stdlib only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config_fields import MAX_BATCH, MAX_EPOCHS, MAX_LR, ConfigError, _c, check_tap_names

HEAD_TYPES = ("linear", "mlp", "knn", "ncm", "classifier")
SWEEP_TYPES = ("linear", "mlp", "knn", "ncm", "logistic")  # pipeline.sweep checks each type's parameters
# The default grid, 22 configurations: 12 linear heads (one joint run), 4 kNN, NCM, 4 logistic C, one MLP.
DEFAULT_GRID = {"linear": {"lr": [0.001, 0.003, 0.01, 0.03], "weight_decay": [0.0, 0.0001, 0.001]},
                "knn": {"k": [5, 10, 20, 50]}, "ncm": {}, "logistic": {"C": [0.01, 0.1, 1.0, 10.0]},
                "mlp": {"hidden": [512], "lr": [0.001]}}


@dataclass
class HeadConfig:
    type: str = _c("linear", "linear (a new nn.Linear, SGD + momentum + StepLR), mlp (Linear-ReLU-Dropout-Linear, "
                   "the same loop), knn (weighted k-nearest neighbours on L2-normalised features, no training), ncm "
                   "(nearest class mean on centred, L2-normalised features) or classifier (the backbone's own "
                   "pretrained dense layers, last one replaced; needs backbone.cut=conv)", choices=HEAD_TYPES)
    epochs: int = _c(25, "training epochs (linear, mlp, classifier)", gt=0, le=MAX_EPOCHS)
    batch_size: int = _c(4, "samples per SGD step (linear, mlp, classifier)", gt=0, le=MAX_BATCH)
    lr: float = _c(0.001, "SGD learning rate (at most 10)", gt=0, le=MAX_LR)
    momentum: float = _c(0.9, "SGD momentum", ge=0, lt=1)
    weight_decay: float = _c(0.0, "SGD weight decay", ge=0, le=1)
    step_size: int = _c(7, "StepLR: epochs between decays", gt=0, le=MAX_EPOCHS)
    gamma: float = _c(0.1, "StepLR: decay factor", gt=0, le=1)
    class_weight: str = _c("none", "none, or balanced: each class's loss weighted by n_samples / (num_classes x its "
                           "train count), scikit-learn's rule (linear, mlp, classifier)", choices=("none", "balanced"))
    hidden: int = _c(512, "mlp: width of the hidden layer", gt=0, le=65536)
    dropout: float = _c(0.0, "mlp: dropout after the hidden ReLU", ge=0, lt=1)
    k: int = _c(20, "knn: neighbours that vote (capped at the train size)", gt=0, le=MAX_BATCH)
    temperature: float = _c(0.07, "knn: votes weighted by exp(cosine similarity / temperature); ncm: probabilities "
                            "softmax(-squared distance / (2 temperature)), the predicted class does not depend on it",
                            gt=0, le=100)
    max_memory_gb: float = _c(4.0, "feature memory budget of the head, logistic and sweep stages, in GiB (2^30 "
                              "bytes): a cache whose train+val features, as float32, exceed it is streamed from disk "
                              "in chunks (logistic then uses an out-of-core SGDClassifier; head.type linear and "
                              "classifier only; sweep refuses)", gt=0, le=1e6)
    tap: str = _c("pool", "the cached tap (backbone.taps) that head, logistic, sweep, report, predict and the API "
                  "train on or use; predict computes the same tap from images", nonempty=True)

    def __post_init__(self) -> None:
        check_tap_names([self.tap], "head.tap")


@dataclass
class LogisticConfig:
    c_grid: list[float] = _c([0.001, 0.01, 0.1, 1.0, 10.0], "inverse regularisation strengths tried",
                             item_gt=0, item_le=1e6, nonempty=True)
    cv_folds: int = _c(3, "cross-validation folds on train for choosing C", ge=2, le=100)
    max_iter: int = _c(1000, "solver iterations", gt=0, le=10_000_000)
    sgd_epochs: int = _c(20, "passes of the out-of-core SGDClassifier over train, per C of the grid and "
                         "again for the refit (streamed caches only; see head.max_memory_gb)", gt=0, le=MAX_EPOCHS)


@dataclass
class SweepStageConfig:
    grid: dict = _c(DEFAULT_GRID, "the sweep stage's grid {head type: {parameter: [values]}}: head types linear, "
                    "mlp, knn, ncm, logistic; parameters as in head.* (logistic: C, max_iter); a parameter left out "
                    "takes its head.* value (logistic.max_iter); linear heads sharing epochs, batch_size and "
                    "class_weight train jointly", grid=True)
    taps: list[str] = _c([], "cached taps the grid runs on, each in turn (the leaderboard shows the tap, the "
                         "winner's head.pt records it); empty: head.tap only")
    top: int = _c(20, "leaderboard rows printed after a sweep (every row is in sweep.md and sweep.json)",
                  gt=0, le=MAX_BATCH)

    def __post_init__(self) -> None:
        check_tap_names(self.taps, "sweep.taps")


@dataclass
class LeaderboardConfig:
    all: bool = _c(False, "list every cache in the ledger (run.output_dir/ledger.jsonl) with its best head, instead "
                   "of the best heads on the current cache (--all)")
    top: int = _c(20, "heads listed for the current cache, best first", gt=0, le=MAX_BATCH)


def check_object(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a JSON object, got {value!r}")
    return value


def check_grid(key: str, value: Any) -> dict:
    """The shape of a sweep grid; each type's parameters and values are checked by the sweep stage."""
    example = '{"linear": {"lr": [0.001, 0.01]}, "knn": {"k": [10, 20]}, "ncm": {}}'
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{key}: expected a non-empty object {{head type: {{parameter: [values]}}}}, e.g. "
                          f"{example}; got {value!r}")
    for head_type, space in value.items():
        if head_type not in SWEEP_TYPES:
            raise ConfigError(f"{key}: unknown head type '{head_type}' (use: {', '.join(SWEEP_TYPES)})")
        if not isinstance(space, dict):
            raise ConfigError(f"{key}.{head_type}: expected an object {{parameter: [values]}} ({{}} for the "
                              f"defaults), got {space!r}")
        for name, values in space.items():
            items = values if isinstance(values, list) else [values]
            if not items or any(isinstance(v, (dict, list)) or v is None for v in items):
                raise ConfigError(f"{key}.{head_type}.{name}: expected a value or a non-empty list of values, "
                                  f"got {values!r}")
    return value
