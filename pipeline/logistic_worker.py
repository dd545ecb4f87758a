"""A sweep's logistic C path, in this process or in a child process started when the sweep starts.

scikit-learn's import takes about 1.7 s here (most of it scipy.stats), more than the four fits of a
grid's C path. In a child process the import and the fits run on another core while this process trains
the torch groups, which leave a core idle during their per-step loops. The child fits exactly what this
process would (the same code, one BLAS thread per fit) and sends back, per C: its seconds, its val (and
test) probabilities from scikit-learn's predict_proba, the pickled fitted pipeline (unpickled here only
if someone asks for the model) and its fold into one linear layer (sweep_stage saves a logistic winner
so). If the child cannot be started or fails, run_sweep fits here instead: the results are the same.

    python -m pipeline.logistic_worker PAYLOAD       (a pickle written by Ahead; the results go to stdout)

This module imports only numpy at the top, so the child starts without torch.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

WORKER = "auto"            # "auto": a child process when the sweep has other work and 2+ CPUs; "on", "off"
WORKER_BYTES = 2 ** 28     # "auto" leaves train features over this size (256 MiB) here: the child would copy them
MISSING_CLASS_BIAS = -1e4  # a folded model's logit for a class absent from train: never chosen


def fit_path(params: Sequence[dict], x: np.ndarray, y: np.ndarray, seed: int) -> Iterator[tuple[int, object, float]]:
    """Yield (index into params, fitted pipeline, seconds) for configs of one max_iter, C ascending.

    One StandardScaler for all; each C starts from the previous C's solution (warm_start): the
    problem is convex, so the solution is the same, reached in fewer iterations. Each fit runs on one
    BLAS thread, as the logistic stage's: BLAS threads spin while they wait, which on a busy machine
    made the logistic stage's search 38 times slower (pipeline/logistic.py).
    """
    import copy

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    t0 = time.perf_counter()
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    share = (time.perf_counter() - t0) / len(params)
    clf = LogisticRegression(max_iter=int(params[0]["max_iter"]), warm_start=True, random_state=seed)
    for i in sorted(range(len(params)), key=lambda i: params[i]["C"]):
        t1 = time.perf_counter()
        with threadpool_limits(1):
            clf.set_params(C=float(params[i]["C"])).fit(xs, y)
        yield i, Pipeline([("scale", scaler), ("clf", copy.deepcopy(clf))]), time.perf_counter() - t1 + share


def fold(model, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """StandardScaler + LogisticRegression as one linear layer's (weight, bias) with the same probabilities.

    softmax(coef @ ((x - mean) / scale) + intercept) = softmax(W x + b) with W = coef / scale and
    b = intercept - W @ mean; a binary model's one row of coef is the logit of classes_[1] against 0.
    """
    scaler, clf = model.named_steps["scale"], model.named_steps["clf"]
    coef, intercept = np.asarray(clf.coef_, np.float64), np.asarray(clf.intercept_, np.float64)
    if coef.shape[0] == 1 and len(clf.classes_) == 2:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    w = coef / scaler.scale_                                     # (n_present, n_features)
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, MISSING_CLASS_BIAS)
    weight[clf.classes_], bias[clf.classes_] = w, intercept - w @ scaler.mean_
    return weight.astype(np.float32), bias.astype(np.float32)


def class_proba(model, X: np.ndarray, num_classes: int, dtype=np.float32) -> np.ndarray:
    """(n, num_classes) probabilities (float32 by default): one column per class index, present in train or not."""
    proba = np.zeros((len(X), num_classes), dtype=dtype)
    proba[:, model.classes_] = model.predict_proba(np.asarray(X))
    return proba


def _work(payload: dict) -> list[list[dict]]:
    """The child's job: every logistic unit's fits, with what the parent needs of each."""
    out = []
    for params in payload["units"]:
        fits = []
        for i, model, seconds in fit_path(params, payload["x"], payload["y"], payload["seed"]):
            fits.append({"index": i, "seconds": seconds, "blob": pickle.dumps(model),
                         "fold": fold(model, payload["num_classes"]),
                         "proba": [class_proba(model, X, payload["num_classes"]) for X in payload["eval"]]})
        out.append(fits)
    return out


def wanted(n_units: int, n_logistic_units: int, nbytes: int) -> bool:
    """Whether to fit in a child: WORKER "on"/"off", or ("auto") when scikit-learn is not imported here
    yet, the sweep has other work to overlap, this process may use 2+ CPUs and the train features (nbytes)
    are at most WORKER_BYTES."""
    if WORKER != "auto" or n_logistic_units == 0:
        return WORKER == "on" and n_logistic_units > 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return "sklearn" not in sys.modules and n_units > n_logistic_units and cpus >= 2 and nbytes <= WORKER_BYTES


class Ahead:
    """The child process fitting the logistic units (lists of {"C", "max_iter"}) of a sweep."""

    def __init__(self, units: list[list[dict]], x: np.ndarray, y: np.ndarray, evals: list[np.ndarray],
                 seed: int, num_classes: int) -> None:
        self.results: Optional[list] = None
        self.proc: Optional[subprocess.Popen] = None
        fd, name = tempfile.mkstemp(prefix="sweep-logistic-", suffix=".pkl")
        self.payload = Path(name)                                  # the child removes it once read
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump({"units": units, "x": x, "y": y, "eval": evals, "seed": seed,
                             "num_classes": num_classes}, f, protocol=pickle.HIGHEST_PROTOCOL)
            root = str(Path(__file__).resolve().parents[1])
            path = os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p])
            self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.logistic_worker", str(self.payload)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         env={**os.environ, "PYTHONPATH": path})
        except (OSError, pickle.PicklingError):                    # no child (a full disk, no interpreter): fit here
            self.close()
            self.results = []

    def collect(self, k: int) -> Optional[list[dict]]:
        """Logistic unit k's fits (C ascending), waiting for the child; None if it failed (then fit here)."""
        if self.results is None:
            try:
                out, err = self.proc.communicate()
                self.results = pickle.loads(out) if self.proc.returncode == 0 else []
                if self.proc.returncode == 0 and err:
                    sys.stderr.write(err.decode(errors="replace"))     # scikit-learn's warnings, as if fitted here
            except Exception:                                          # noqa: BLE001 (any failure: fit here)
                self.results = []
            finally:
                self.close()
        return self.results[k] if k < len(self.results) else None

    def close(self) -> None:
        """Stop the child if it still runs (Ctrl-C, an error) and remove the payload."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
        self.payload.unlink(missing_ok=True)


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as f:
        job = pickle.load(f)
    os.unlink(sys.argv[1])
    sys.stdout.buffer.write(pickle.dumps(_work(job), protocol=pickle.HIGHEST_PROTOCOL))
