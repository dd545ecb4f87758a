"""Typed, versioned records of what stages hand each other: model files and metrics entries.

A model file (head.pt, logistic.joblib, finetune.pt) holds a plain dict, so that torch's
weights_only loader can read it; `ModelArtifact` is its one definition: `to_dict()` writes it,
`from_dict()` reads it and checks its version. Files written before records existed carry no
`record_version` and are read as version 0 (the same keys). A file from a newer version fails
with a message naming both versions.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

from pipeline import PipelineError

RECORD_VERSION = 1
KINDS = ("head", "logistic", "finetune")
# Where each kind keeps its weights in the file (head: a state dict, logistic: a fitted
# scikit-learn Pipeline, finetune: the whole network's state dict).
WEIGHTS_KEY = {"head": "state_dict", "logistic": "model", "finetune": "model"}
# What each kind of model file must hold to be rebuilt (a hand-made file may hold less).
REQUIRED_KEYS = {"head": ("classes", "state_dict", "feature_dim", "backbone_config", "backbone", "seed"),
                 "logistic": ("classes", "model", "feature_dim", "backbone_config", "backbone", "seed"),
                 "finetune": ("classes", "model", "backbone_config", "backbone", "seed")}


TEST_FIELDS = ("test_acc", "test_mean_per_class")


class RecordError(PipelineError):
    """A model file or metrics entry that this version cannot read; the message names the file and version."""


def _check_version(found: Any, source: str) -> int:
    version = 0 if found is None else found
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise RecordError(f"{source}: record_version {found!r} is not a version number")
    if version > RECORD_VERSION:
        raise RecordError(f"{source} was written by a newer version of this tool (record version {version}; "
                          f"this one reads versions up to {RECORD_VERSION}): upgrade, or run the stage again")
    return version


@dataclass
class ModelArtifact:
    """What a saved model is: its classes, the backbone whose features it reads, its weights and config."""

    kind: str                              # head | logistic | finetune
    classes: list[str]
    weights: Any                           # kept under WEIGHTS_KEY[kind]
    config: dict                           # the stage's own section, kept under "<kind>_config"
    backbone: dict                         # backbones.BackboneSpec.to_dict()
    backbone_config: dict                  # backbone.* that rebuild it
    seed: int                              # a random-init backbone is rebuilt from it
    data_root: str                         # where the images of the rows were (report, predict)
    feature_dim: Optional[int] = None      # head, logistic
    cache_key: Optional[str] = None        # head, logistic: the features it was trained on
    cache_file: Optional[str] = None
    history: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)   # the stage's own facts (best_epoch, C, cv, estimator, ...)
    record_version: int = RECORD_VERSION
    source: str = field(default="model file", compare=False, repr=False)  # where it was read from (messages)

    def to_dict(self) -> dict:
        if self.kind not in KINDS:
            raise RecordError(f"unknown model kind '{self.kind}' (kinds: {', '.join(KINDS)})")
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if f.name not in ("weights", "config", "extra", "source")}
        out = {k: v for k, v in out.items() if v is not None}
        return {**out, WEIGHTS_KEY[self.kind]: self.weights, f"{self.kind}_config": self.config, **self.extra}

    @classmethod
    def from_dict(cls, d: dict, source: str = "model file", kind: Optional[str] = None) -> "ModelArtifact":
        """Read a model file's dict; RecordError naming source when its version or kind cannot be read, or
        naming every key it lacks. kind: what the caller expects (a hand-made file may not say)."""
        if not isinstance(d, dict):
            raise RecordError(f"{source} is not a model file written by this tool")
        version = _check_version(d.get("record_version"), source)
        kind = d.get("kind", kind)
        if kind not in KINDS:
            raise RecordError(f"{source} has no known 'kind' ({kind!r}; kinds: {', '.join(KINDS)})")
        missing = [k for k in REQUIRED_KEYS[kind] if k not in d]
        if isinstance(d.get("backbone"), dict):
            missing += [f"backbone.{k}" for k in ("weights_id", "preprocess") if k not in d["backbone"]]
        if missing:
            raise RecordError(f"{source} (record version {version}) lacks {', '.join(missing)}: run the {kind} "
                              "stage again")
        named = {f.name for f in fields(cls)} - {"weights", "config", "extra", "record_version", "source"}
        known = named | {WEIGHTS_KEY[kind], f"{kind}_config", "record_version"}
        return cls(kind=kind, classes=list(d["classes"]), weights=d[WEIGHTS_KEY[kind]],
                   config=d.get(f"{kind}_config", {}), backbone=d["backbone"], backbone_config=d["backbone_config"],
                   seed=int(d.get("seed", 0)), data_root=str(d.get("data_root", "")),
                   feature_dim=d.get("feature_dim"), cache_key=d.get("cache_key"), cache_file=d.get("cache_file"),
                   history=list(d.get("history", [])), versions=dict(d.get("versions", {})),
                   extra={k: v for k, v in d.items() if k not in known}, record_version=version, source=source)

    def require(self, *keys: str) -> None:
        """RecordError naming the file, its version and every one of keys (stage facts in `extra`) it lacks."""
        _require(self.extra, keys, self.source, self.record_version, self.kind)


@dataclass
class StageResult:
    """A training stage's entry in metrics.json: the common fields, and the stage's own under `details`."""

    stage: str
    val_acc: float
    seconds: float
    model_file: str
    history: list = field(default_factory=list)
    details: dict = field(default_factory=dict)
    record_version: int = RECORD_VERSION
    # the chosen model on the test split, scored once after selection (pipeline.selection); None: no test split
    test_acc: Optional[float] = None
    test_mean_per_class: Optional[float] = None
    source: str = field(default="metrics.json", compare=False, repr=False)  # where it was read from (messages)

    def to_dict(self) -> dict:
        tested = {k: getattr(self, k) for k in TEST_FIELDS if getattr(self, k) is not None}
        return {"val_acc": self.val_acc, "seconds": self.seconds, "model_file": self.model_file,
                "history": self.history, "record_version": self.record_version, **tested, **self.details}

    @classmethod
    def from_dict(cls, stage: str, d: dict, source: str = "metrics.json") -> "StageResult":
        version = _check_version(d.get("record_version"), f"{source} entry '{stage}'")
        missing = [k for k in ("val_acc", "seconds") if k not in d]
        if missing:
            raise RecordError(f"{source} entry '{stage}' (record version {version}) lacks {', '.join(missing)}: "
                              f"run the {stage} stage again")
        common = {"val_acc", "seconds", "model_file", "history", "record_version", *TEST_FIELDS}
        tested = {k: None if d.get(k) is None else float(d[k]) for k in TEST_FIELDS}
        return cls(stage, float(d["val_acc"]), float(d["seconds"]), str(d.get("model_file", "")),
                   list(d.get("history", [])), {k: v for k, v in d.items() if k not in common}, version,
                   source=source, **tested)

    def require(self, *keys: str) -> dict:
        """The stage's own facts (`details`) a reader needs; RecordError naming the source, the entry's
        version and every one of keys it lacks (a renamed key fails here, at load, not later)."""
        _require(self.details, keys, f"{self.source} entry '{self.stage}'", self.record_version, self.stage)
        return self.details


def _require(found: dict, keys: tuple[str, ...], source: str, version: int, stage: str) -> None:
    missing = [k for k in keys if k not in found]
    if missing:
        raise RecordError(f"{source} (record version {version}) lacks {', '.join(missing)}: run the {stage} "
                          "stage again")
