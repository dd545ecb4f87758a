"""Probes of one head type fitted together, sharing the work their configurations have in common (the sweep).

- kNN: the val-train similarities and the k_max nearest train rows are computed once for every
  (k, temperature) of the group; each configuration's votes come from the first k of them, so its
  predictions are the ones its KNNProbe gives alone (tests/test_probes.py checks it).
- NCM: the class means and the val rows' distances to them are computed once; each temperature is a
  softmax of those distances.
- MLP: the MLPs that share epochs, batch_size and class_weight train together, their hidden units the
  row groups of one lazy_sgd LazyLayer (pipeline/lazy_mlp.py); each equals the same MLP trained alone
  with the same seed and batch order, within float tolerance (with dropout: the same masks, drawn from
  its own generator), and keeps its own best epoch. On CUDA an MLP with dropout trains alone: there
  fit_module's fused dropout kernel draws masks this loop cannot repeat.

Every function returns, per configuration in the given order, (fitted probe, val probabilities (n_val, C)).
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence, Union

import numpy as np
import torch

from pipeline.probes import FitResult, KNNConfig, KNNProbe, MLPConfig, MLPProbe, NCMConfig, NCMProbe, knn_proba

def mlp_group_key(cfg: MLPConfig, device: Union[str, torch.device] = "cpu") -> Optional[tuple]:
    """MLP configs with equal keys train in one joint run; None: this one trains alone (dropout > 0 off
    the CPU: probes.fit_module)."""
    if cfg.dropout and torch.device(device).type != "cpu":
        return None
    from pipeline.joint import shared_key   # the MLPs of one joint run share the batches and loss, as linear heads

    return shared_key(cfg)


def _scored(probe, proba: np.ndarray, labels_val: torch.Tensor) -> tuple:
    """(probe, its val probabilities), the probe's result their val top-1 (no training: epoch 0)."""
    probe.result = FitResult(0, float((proba.argmax(1) == np.asarray(labels_val)).mean()))
    return probe, proba


def fit_knn_group(configs: Sequence[KNNConfig], x: torch.Tensor, labels: torch.Tensor, x_val: torch.Tensor,
                  labels_val: torch.Tensor, num_classes: int, seed: int = 0,
                  device: Union[str, torch.device] = "cpu") -> list[tuple[KNNProbe, np.ndarray]]:
    """Every kNN config on one bank and one top-k_max search of the val rows."""
    first = KNNProbe(configs[0], num_classes=num_classes, seed=seed, device=device).fit(x, labels)
    sims, idx = first.neighbours(first._check_fitted(x_val), max(c.k for c in configs))
    neighbour_labels = first.labels[idx]                                     # (n_val, k_max)
    out = []
    for cfg in configs:
        probe = copy.copy(first)
        probe.cfg = cfg
        k = min(cfg.k, len(first.bank))
        out.append(_scored(probe, knn_proba(sims[:, :k], neighbour_labels[:, :k], cfg.temperature,
                                            first.num_classes), labels_val))
    return out


def fit_ncm_group(configs: Sequence[NCMConfig], x: torch.Tensor, labels: torch.Tensor, x_val: torch.Tensor,
                  labels_val: torch.Tensor, num_classes: int, seed: int = 0,
                  device: Union[str, torch.device] = "cpu") -> list[tuple[NCMProbe, np.ndarray]]:
    """Every NCM config (temperature) on one set of class means and one distance computation."""
    first = NCMProbe(configs[0], num_classes=num_classes, seed=seed, device=device).fit(x, labels)
    d2 = first.distances(first._check_fitted(x_val))
    out = []
    for cfg in configs:
        probe = copy.copy(first)
        probe.cfg = cfg
        out.append(_scored(probe, probe.proba_from(d2), labels_val))
    return out


def fit_mlp_group(configs: Sequence[MLPConfig], x: torch.Tensor, labels: torch.Tensor, x_val: torch.Tensor,
                  labels_val: torch.Tensor, num_classes: int, seed: int = 0,
                  device: Union[str, torch.device] = "cpu") -> list[tuple[MLPProbe, np.ndarray]]:
    """MLPs of one mlp_group_key trained jointly; each starts from the weights its probe draws alone."""
    from pipeline.lazy_mlp import train_mlps

    probes = [MLPProbe(c, num_classes=num_classes, seed=seed, device=device) for c in configs]
    for probe in probes:
        xs, ys, xv, yv = probe._inputs(x, labels, x_val, labels_val)
        torch.manual_seed(seed)        # the initial weights, as TrainedProbe.fit draws them alone
        probe.model = probe.build(xs.shape[1], probe.num_classes)
    fitted = train_mlps([p.model for p in probes], xs, ys, xv, yv, list(configs), probes[0].num_classes, seed,
                        probes[0].device)
    out = []
    for probe, (state, result) in zip(probes, fitted):
        probe.model.load_state_dict(state)
        probe.result = result
        out.append((probe, probe.predict_proba(xv) if xv is not None else None))
    return out
