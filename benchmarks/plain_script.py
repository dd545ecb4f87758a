"""The shortest honest in-memory script for extraction + logistic regression (what vs_script.py compares with).

    python benchmarks/plain_script.py DATA_ROOT BACKBONE IMAGE_SIZE BATCH_SIZE NUM_WORKERS

No cache, no hashing, no HDF5, no checks: torchvision's ImageFolder, the same backbone and preprocessing as
the pipeline, one inference pass over train and val, then GridSearchCV over the same C grid and folds.
Prints the val accuracy and the chosen C.
"""
import sys

import _common  # noqa: F401  (puts the repo on sys.path)
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from pipeline.backbones import build_feature_extractor, resolve_backbone
from pipeline.config import BackboneConfig
from pipeline.data import eval_transform, resolve_data_root

root, name, size, batch_size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
cfg = BackboneConfig(name=name, weights="DEFAULT", image_size=size)
spec = resolve_backbone(cfg, seed=0)
model = build_feature_extractor(cfg, spec, fold=False)  # a user's script does not fold batch norm


@torch.inference_mode()
def features(split):
    data = ImageFolder(str(resolve_data_root(root) / split), transform=eval_transform(spec.preprocess))
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers)
    return np.concatenate([model(x).numpy() for x, _ in loader]), np.array(data.targets)


(x, y), (vx, vy) = features("train"), features("val")
search = GridSearchCV(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
                      {"logisticregression__C": [0.001, 0.01, 0.1, 1.0, 10.0]},
                      cv=StratifiedKFold(3, shuffle=True, random_state=0)).fit(x, y)
print(f"val_acc {search.score(vx, vy):.4f} C={search.best_params_['logisticregression__C']}")
