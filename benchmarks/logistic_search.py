"""The logistic stage's C search with the BLAS library's default threads (what the stage did before)
against the stage's own fit_logistic (one BLAS thread per fit, fits side by side on the free cores).

    python benchmarks/logistic_search.py [--cache cache/<name>.h5] [--repeat 2]

Both are GridSearchCV: the same C grid (params.json's logistic.c_grid) with the same stratified folds and seed over
a Pipeline(StandardScaler, LogisticRegression) on a feature cache's train rows, then refit at the chosen
C; printed side by side in one run (best of --repeat, interleaved): seconds, chosen C, cross-validated
accuracy, val accuracy, and the ratio of the two times. Without --cache, the newest cache in cache/.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repo on sys.path)
import h5py
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from _common import REPO, table
from pipeline.config import load_config
from pipeline.logistic import fit_logistic


def read_split(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as f:
        return f[split]["features"][()].astype(np.float32), f[split]["labels"][()]


def grid_search(x, y, cfg, seed):
    model = Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(max_iter=cfg.max_iter))])
    return GridSearchCV(model, {"clf__C": list(cfg.c_grid)}, scoring="accuracy", refit=True,
                        cv=StratifiedKFold(n_splits=cfg.cv_folds, shuffle=True, random_state=seed)).fit(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=None, help="feature cache .h5 (default: the newest in cache/)")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs of each side (default 2)")
    args = parser.parse_args()
    path = Path(args.cache) if args.cache else max((REPO / "cache").glob("*.h5"), key=os.path.getmtime)
    cfg = load_config(REPO / "params.json")
    (x, y), (vx, vy) = read_split(path, "train"), read_split(path, "val")
    print(f"{path.name}: {x.shape[0]} train x {x.shape[1]} features, {len(vx)} val; C grid {cfg.logistic.c_grid}, "
          f"{cfg.logistic.cv_folds} folds; load average {os.getloadavg()[0]:.2f}")
    sides = (("GridSearchCV, default BLAS threads", grid_search, None),
             ("fit_logistic (the stage)", fit_logistic, None))
    rows, times = {}, {name: [] for name, _, _ in sides}
    for _ in range(args.repeat):  # interleaved so that every side sees the same machine
        for name, fit, blas in sides:
            t0 = time.perf_counter()
            with threadpool_limits(blas):
                search = fit(x, y, cfg.logistic, cfg.run.seed)
            times[name].append(time.perf_counter() - t0)
            rows[name] = (search.best_params_["clf__C"], search.best_score_, search.score(vx, vy))
    base = min(times[sides[0][0]])
    print(table([(name, f"{min(t):.2f}", f"{base / min(t):.2f}x", f"{rows[name][0]:g}", f"{rows[name][1]:.4f}",
                  f"{rows[name][2]:.4f}") for name, t in times.items()],
                ("search", "seconds", "speed-up", "C", "cv acc", "val acc")))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
