import pytest
import torch

from pipeline.artifacts import load_checkpoint
from pipeline.config import HeadConfig
from pipeline.head import run_head, train_head
from pipeline.metrics import read_metrics

CPU = torch.device("cpu")


def blobs(n_per_class=30, dim=16, classes=3, seed=0):
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=g)
    return x, y


def test_linear_head_learns_separable_features():
    x, y = blobs()
    vx, vy = blobs(seed=1)
    result = train_head(x, y, vx, vy, 3, HeadConfig(epochs=5), CPU, seed=0)
    assert result.best_acc == 1.0
    assert result.state_dict["weight"].shape == (3, 16)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]


def test_steplr_schedule_is_recorded():
    x, y = blobs()
    result = train_head(x, y, x, y, 3, HeadConfig(epochs=9, lr=0.1, step_size=3, gamma=0.5), CPU, seed=0)
    assert [h["lr"] for h in result.history] == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3)


def test_best_epoch_weights_are_kept():
    x, y = blobs()
    vx, vy = blobs(seed=2)
    result = train_head(x, y, vx, vy, 3, HeadConfig(epochs=6), CPU, seed=0)
    best = max(h["val_acc"] for h in result.history)
    assert result.best_acc == best
    assert result.history[result.best_epoch - 1]["val_acc"] == best
    head = torch.nn.Linear(16, 3)
    head.load_state_dict(result.state_dict)
    assert (head(vx).argmax(1) == vy).float().mean().item() == pytest.approx(best)


def test_same_seed_same_weights():
    x, y = blobs()
    a = train_head(x, y, x, y, 3, HeadConfig(epochs=2), CPU, seed=5)
    b = train_head(x, y, x, y, 3, HeadConfig(epochs=2), CPU, seed=5)
    c = train_head(x, y, x, y, 3, HeadConfig(epochs=2), CPU, seed=6)
    assert torch.equal(a.state_dict["weight"], b.state_dict["weight"])
    assert not torch.equal(a.state_dict["weight"], c.state_dict["weight"])


def test_run_head_from_cache_saves_a_rebuildable_artifact(tiny_cfg):
    cfg = tiny_cfg("head.epochs=4", "head.lr=0.01")
    entry = run_head(cfg, CPU)
    assert entry["val_acc"] >= 0.5 and 1 <= entry["best_epoch"] <= 4
    ckpt = load_checkpoint(cfg.run_dir / "head.pt")
    assert ckpt["classes"] == ["ants", "bees"] and ckpt["feature_dim"] == 512
    assert ckpt["backbone_config"] == {"name": "resnet18", "weights": "none", "image_size": 32}
    assert ckpt["backbone"]["preprocess"]["crop_size"] == 32
    metrics = read_metrics(cfg.run_dir)
    assert set(metrics) == {"extract", "head"}  # the cache was built on demand
    assert metrics["head"]["val_acc"] == entry["val_acc"] and "seconds" in metrics["head"]
