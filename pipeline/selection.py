"""Honest selection: a stage chooses its model on val (or on train), then scores test once, for that model.

The test split (a test/ folder, or data.test_fraction) never takes part in choosing anything: the
stages call `score_test` only after their choice is final, once, and record what it returns next to
val_acc. `selected_on` says what the choice looked at, so the results table can say which val
figures are optimistic (they chose the model they score). numpy only; torch lazily (`module_proba`).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from pipeline.analysis import score_proba

Proba = Callable[[np.ndarray], np.ndarray]   # (n_samples, feature_dim) -> (n_samples, num_classes)


def score_test(stage: str, inputs: Any, predict_proba: Proba, selected_on: str) -> dict:
    """The metrics fields for the chosen model on the test split, printed in one line.

    inputs: anything with an optional `test` (features (n, feature_dim), labels (n,)), such as
    orchestrate.StageFeatures; predict_proba is called once, on the test features only.
    Returns selected_on and test_acc (None without a test split), test_mean_per_class, n_test.
    """
    test = getattr(inputs, "test", None)
    if test is None or len(test.labels) == 0:
        return {"selected_on": selected_on, "test_acc": None}
    proba = predict_proba(np.asarray(test.features, dtype=np.float32))
    s = score_proba(test.labels, proba)
    print(f"{stage}: test top-1 {s['acc']:.4f}, mean per-class {s['mean_per_class']:.4f} on {s['n']} test "
          f"images (scored once, after choosing on {selected_on})")
    return {"selected_on": selected_on, "test_acc": s["acc"], "test_mean_per_class": s["mean_per_class"],
            "n_test": s["n"]}


def module_proba(module, device, batch_size: int = 4096) -> Proba:
    """predict_proba of a torch classifier over features: softmax of its logits, in eval mode."""
    import torch

    def proba(x: np.ndarray) -> np.ndarray:
        module.eval()
        out = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                logits = module(torch.from_numpy(x[start:start + batch_size]).to(device))
                out.append(torch.softmax(logits.float(), 1).cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, 0))
    return proba

