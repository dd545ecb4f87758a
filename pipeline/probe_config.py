"""Configuration and input checks of the head zoo (see ``pipeline.probes`` for the probes themselves).

One typed config per head type with its defaults, the help text of every parameter, the table of what
each parameter allows, and the conversion of feature / label arrays into checked CPU tensors. Imports
only numpy and torch, so validating a config costs nothing else.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from pipeline import PipelineError

HEAD_TYPES = ("linear", "mlp", "knn", "ncm")
CLASS_WEIGHTS = ("none", "balanced")

Array = Union[np.ndarray, torch.Tensor]


class ProbeError(PipelineError, ValueError):
    """A probe parameter or input that cannot be used; the message names it and what is allowed."""


# ----------------------------------------------------------------------------- configs (defaults)
@dataclass
class LinearConfig:
    epochs: int = 25              # training epochs
    batch_size: int = 4           # samples per SGD step
    lr: float = 0.001             # SGD learning rate
    momentum: float = 0.9         # SGD momentum
    weight_decay: float = 0.0     # SGD weight decay
    step_size: int = 7            # StepLR: epochs between decays
    gamma: float = 0.1            # StepLR: decay factor
    class_weight: str = "none"    # none, or balanced: loss weight n_samples / (num_classes * n_c) per class


@dataclass
class MLPConfig(LinearConfig):
    hidden: int = 512             # width of the hidden layer
    dropout: float = 0.0          # dropout after the hidden ReLU


@dataclass
class KNNConfig:
    k: int = 20                   # neighbours that vote (DINO's default); capped at the train size
    temperature: float = 0.07     # vote weight exp(cosine similarity / temperature) (DINO's default)


@dataclass
class NCMConfig:
    temperature: float = 0.07     # probabilities softmax(-||z - mean_c||^2 / (2 temperature)); argmax unaffected


# Help texts for --help once the head types are config keys (one per parameter name).
PARAM_HELP = {
    "epochs": "training epochs", "batch_size": "samples per SGD step", "lr": "SGD learning rate",
    "momentum": "SGD momentum", "weight_decay": "SGD weight decay", "step_size": "StepLR: epochs between decays",
    "gamma": "StepLR: decay factor",
    "class_weight": "none, or balanced: each class's loss weighted by n_samples / (num_classes * its count)",
    "hidden": "mlp: width of the hidden layer", "dropout": "mlp: dropout after the hidden ReLU",
    "k": "knn: neighbours that vote (capped at the train size)",
    "temperature": "knn: votes weighted by exp(cosine similarity / temperature); ncm: probabilities "
                   "softmax(-squared distance / (2 temperature)), the predicted class does not depend on it",
}

CONFIGS = {"linear": LinearConfig, "mlp": MLPConfig, "knn": KNNConfig, "ncm": NCMConfig}

# name -> (check, what is allowed): one table, as scikit-learn's _parameter_constraints.
_INT, _NUM = (int, np.integer), (int, float, np.integer, np.floating)
CONSTRAINTS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epochs": (lambda v: isinstance(v, _INT) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "batch_size": (lambda v: isinstance(v, _INT) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "step_size": (lambda v: isinstance(v, _INT) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "hidden": (lambda v: isinstance(v, _INT) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "k": (lambda v: isinstance(v, _INT) and not isinstance(v, bool) and v > 0, "an integer > 0"),
    "lr": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v) and v > 0, "a number > 0"),
    "temperature": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
                    "a number > 0"),
    "momentum": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
                     "a number >= 0"),
    "gamma": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool) and 0 < v <= 1, "a number in (0, 1]"),
    "dropout": (lambda v: isinstance(v, _NUM) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"),
    "class_weight": (lambda v: v in CLASS_WEIGHTS, "one of " + ", ".join(CLASS_WEIGHTS)),
}


def param_names(head_type: str) -> tuple[str, ...]:
    """The parameters a head type takes, in its config's order."""
    return tuple(f.name for f in dataclasses.fields(CONFIGS[check_head_type(head_type)]))


def check_head_type(head_type: str) -> str:
    if head_type not in CONFIGS:
        raise ProbeError(f"head type '{head_type}' is not known (use one of: {', '.join(HEAD_TYPES)})")
    return head_type


def check_config(head_type: str, cfg: Any) -> Any:
    """Raise ProbeError naming the first parameter of cfg outside its allowed range."""
    for f in dataclasses.fields(cfg):
        ok, allowed = CONSTRAINTS[f.name]
        value = getattr(cfg, f.name)
        if not ok(value):
            raise ProbeError(f"{head_type}.{f.name} = {value!r}: must be {allowed}")
    return cfg


def make_config(head_type: str, params: Optional[dict] = None) -> Any:
    """The checked config of head_type with params over its defaults; an unknown parameter is an error."""
    params = dict(params or {})
    allowed = param_names(head_type)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ProbeError(f"{head_type} has no parameter '{unknown[0]}' (its parameters: {', '.join(allowed)})")
    return check_config(head_type, CONFIGS[head_type](**params))


# ----------------------------------------------------------------------------- inputs
def as_features(X: Array, name: str = "X") -> torch.Tensor:
    """(n_samples, n_features) float32 tensor on the CPU, sharing memory with X where it can."""
    t = X if isinstance(X, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    if t.ndim != 2:
        raise ProbeError(f"{name} must have shape (n_samples, n_features), got {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float32)


def as_labels(y: Array, n_samples: int, name: str = "y") -> torch.Tensor:
    """(n_samples,) int64 tensor of class indices >= 0."""
    try:
        t = y.detach().cpu() if isinstance(y, torch.Tensor) else torch.from_numpy(np.asarray(y))
    except TypeError:
        raise ProbeError(f"{name} must hold integer class indices, got {np.asarray(y).dtype}") from None
    if t.ndim != 1 or len(t) != n_samples:
        raise ProbeError(f"{name} must have shape ({n_samples},) to match the features, got {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        if not bool(torch.all(t == t.round())):
            raise ProbeError(f"{name} must hold integer class indices")
    t = t.to(torch.int64)
    if len(t) and int(t.min()) < 0:
        raise ProbeError(f"{name} holds a negative class index ({int(t.min())})")
    return t


def balanced_weights(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) loss weights n_samples / (num_classes * n_c), scikit-learn's 'balanced'.

    A class absent from y gets weight 0: it has no sample whose loss could be weighted.
    """
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    weights = len(y) / (num_classes * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


def loss_weights(y: torch.Tensor, num_classes: int, class_weight: str) -> Optional[torch.Tensor]:
    return balanced_weights(y, num_classes) if class_weight == "balanced" else None


def infer_num_classes(*labels: Optional[torch.Tensor]) -> int:
    return max(int(t.max()) + 1 for t in labels if t is not None and len(t))
