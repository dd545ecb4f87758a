from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cache as fc
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
    assert ckpt["backbone_config"] == {"name": "resnet18", "weights": "none", "image_size": 32, "cut": "pool"}
    assert ckpt["head_type"] == "linear"
    assert ckpt["backbone"]["preprocess"]["crop_size"] == 32
    metrics = read_metrics(cfg.run_dir)
    assert set(metrics) == {"extract", "head"}  # the cache was built on demand
    assert metrics["head"]["val_acc"] == entry["val_acc"] and "seconds" in metrics["head"]


@pytest.mark.parametrize("name, size", [("vgg11", 32), ("alexnet", 64)])
def test_own_dense_classifier_trains_from_the_conv_cache(tmp_path, name, size):
    """The 'pre-convoluted features' recipe: cache the conv trunk, train the model's own dense layers."""
    from pipeline import cache as fc
    from pipeline.backbones import build_network, resolve_backbone
    from pipeline.config import load_config
    from tests.conftest import make_image_folder, tiny_overrides

    root = make_image_folder(tmp_path / "imgs", n_train=2, n_val=1)
    cfg = load_config(None, tiny_overrides(tmp_path, root) + [
        f"backbone.name={name}", f"backbone.image_size={size}", "backbone.cut=conv", "head.type=classifier",
        "extract.dtype=float16", "head.epochs=2", "head.lr=0.01"])  # 4 images, batch 4: a step per epoch
    entry = run_head(cfg, CPU)
    ckpt = load_checkpoint(cfg.run_dir / "head.pt")
    assert ckpt["head_type"] == "classifier" and ckpt["backbone_config"]["cut"] == "conv"
    cache = fc.read_cache(read_metrics(cfg.run_dir)["extract"]["cache_file"])
    assert cache.train.features.dtype == np.float16 and cache.feature_dim == ckpt["feature_dim"]
    linears = [k for k in ckpt["state_dict"] if k.endswith(".weight")]
    first, last = ckpt["state_dict"][linears[0]], ckpt["state_dict"][linears[-1]]
    assert first.shape == (4096, cache.feature_dim) and last.shape == (2, 4096)
    # trained, starting from the backbone's own (here randomly initialised, seeded) dense weights
    torch.manual_seed(cfg.run.seed)
    own = build_network(cfg.backbone, resolve_backbone(cfg.backbone, cfg.run.seed)).classifier.state_dict()
    assert not torch.equal(first, own[linears[0]])
    assert (first - own[linears[0]]).abs().max() < 0.05 * own[linears[0]].abs().max()
    assert 0.0 <= entry["val_acc"] <= 1.0 and len(entry["history"]) == 2


def test_classifier_head_starts_from_the_backbone_dense_weights(tiny_cfg):
    from pipeline.backbones import build_network, resolve_backbone
    from pipeline.head import build_head

    cfg = tiny_cfg("backbone.name=vgg11", "backbone.cut=conv", "head.type=classifier")
    spec = resolve_backbone(cfg.backbone, cfg.run.seed)
    head = build_head(cfg.head.type, cfg.backbone, spec, cfg.run.seed, 25088, 2)
    torch.manual_seed(cfg.run.seed)
    net = build_network(cfg.backbone, spec)
    assert torch.equal(head[0].weight, net.classifier[0].weight)
    assert torch.equal(head[3].weight, net.classifier[3].weight)
    assert head[6].out_features == 2
    assert [type(m).__name__ for m in head] == [type(m).__name__ for m in net.classifier]  # dropout kept


@pytest.mark.parametrize("overrides, message", [
    (["head.type=classifier"], r"head.type 'classifier' needs a backbone with its own dense classifier .*vgg11"),
    (["head.type=classifier", "backbone.name=vgg11"], "set backbone.cut=conv"),
])
def test_classifier_head_misconfigurations_name_the_key(tiny_cfg, overrides, message):
    from pipeline import PipelineError

    cfg = tiny_cfg(*overrides)
    with pytest.raises(PipelineError, match=message):
        run_head(cfg, CPU)
    assert not (cfg.run_dir / "head.pt").exists() and not cfg.run_dir.exists()  # failed before extracting


# ----------------------------------------------------------------------------- streamed from the cache
def test_streamed_full_batch_training_equals_in_memory(tmp_path):
    """One batch per epoch: the order of rows cannot matter, so streaming must train the same weights."""
    from pipeline.head import fit_head
    from pipeline.stream import StreamBatches
    from tests.conftest import write_feature_cache

    x, y = blobs(n_per_class=200)  # 600 rows: 3 chunks, class-sorted
    vx, vy = blobs(seed=1)
    write_feature_cache(tmp_path / "c.h5", {"train": (x.numpy(), y.numpy()), "val": (vx.numpy(), vy.numpy())},
                        ["a", "b", "c"])
    cfg = HeadConfig(epochs=4, batch_size=600, lr=0.05)
    in_memory = train_head(x, y, vx, vy, 3, cfg, CPU, seed=0)
    with fc.open_features(tmp_path / "c.h5") as r:
        torch.manual_seed(0)
        streamed = fit_head(torch.nn.Linear(16, 3), StreamBatches(r.train, 600, 2 ** 20, shuffle=True, seed=0),
                            StreamBatches(r.val, 64, 2 ** 20, shuffle=False), cfg, CPU, seed=0)
    assert torch.allclose(streamed.state_dict["weight"], in_memory.state_dict["weight"], atol=1e-5)
    assert [h["val_acc"] for h in streamed.history] == [h["val_acc"] for h in in_memory.history]
    assert streamed.best_epoch == in_memory.best_epoch


def test_run_head_streams_a_cache_bigger_than_its_budget(tiny_cfg, capsys):
    from pipeline.predictor import load_predictor
    from pipeline.report import report_paths, run_report

    in_memory = run_head(tiny_cfg("head.epochs=4", "head.lr=0.01", "run.name=memory"), CPU)
    assert in_memory["streamed"] is False
    capsys.readouterr()
    cfg = tiny_cfg("head.epochs=4", "head.lr=0.01", "head.max_memory_gb=1e-5", "report.enabled=true")
    entry = run_head(cfg, CPU)
    out = capsys.readouterr().out
    assert "head: cache is 0.0 MiB of float32 features > head.max_memory_gb=1e-05 (0.0 MiB): streaming from" in out
    assert entry["streamed"] is True and entry["buffer_rows"] == 12 and entry["chunk_rows"] == 12
    assert abs(entry["val_acc"] - in_memory["val_acc"]) <= 0.01
    assert entry["val_acc_top1"] == entry["val_acc"]  # val streamed in order: predictions line up with labels
    assert read_metrics(cfg.run_dir)["head"]["streamed"] is True
    ckpt = load_checkpoint(cfg.run_dir / "head.pt")
    assert ckpt["streamed"] is True
    assert report_paths(cfg.run_dir, "head")["confusion_matrix"].exists()
    assert run_report(cfg, CPU)["head"]["val_acc_top1"] == entry["val_acc"]  # the report stage reads val in chunks
    val = fc.read_cache(ckpt["cache_file"]).val
    probs = load_predictor(cfg.run_dir, "head", CPU).probs_from_features(val.features)
    assert np.mean(probs.argmax(1) == val.labels) == pytest.approx(entry["val_acc"])


def test_view_bank_beyond_the_budget_is_refused_naming_both_keys(tiny_cfg):
    from pipeline import PipelineError

    cfg = tiny_cfg("extract.train_views=2", "head.max_memory_gb=1e-5")
    with pytest.raises(PipelineError, match=r"extract.train_views=2 keeps the view bank in memory .*"
                                            r"head.max_memory_gb=1e-05.*set extract.train_views=0.*"
                                            r"raise head.max_memory_gb to at least 0.001"):
        run_head(cfg, CPU)
    assert not list((cfg.run_dir.parent.parent / "cache").glob("*.views-*"))  # refused before building the bank


def test_a_checksum_failing_mid_stream_removes_the_cache_and_says_to_rerun(tiny_cfg):
    from tests.conftest import flip_feature_byte

    cfg = tiny_cfg("head.max_memory_gb=1e-5")
    run_head(cfg, CPU)  # builds the cache
    cache_file = Path(read_metrics(cfg.run_dir)["extract"]["cache_file"])
    flip_feature_byte(cache_file, "train", chunk=0)
    with pytest.raises(fc.CacheError, match="cannot read rows 0..11 of 'train/features'.*the damaged cache was "
                                            "removed: run the stage again"):
        run_head(cfg, CPU)
    assert not cache_file.exists()
    assert run_head(cfg, CPU)["streamed"] is True and cache_file.exists()  # extracted anew


def test_a_diverged_loss_stops_the_run_with_a_line():
    from pipeline import PipelineError
    from pipeline.config import HeadConfig
    from pipeline.head import train_head

    x, y = torch.full((8, 4), 1e38), torch.tensor([0, 1] * 4)
    with pytest.raises(PipelineError, match=r"head: the training loss diverged \(.*\) in epoch 1: lower head.lr"):
        train_head(x, y, x, y, 2, HeadConfig(epochs=2, lr=10.0), torch.device("cpu"), 0)


# ----------------------------------------------------------------------------- the head zoo in the stage
def test_balanced_class_weight_trains_the_probes_weights():
    """head.class_weight=balanced in the stage's loop is the probes' (scikit-learn's) weighting, same weights."""
    from pipeline.probes import build_probe

    x, y = blobs(n_per_class=30)
    keep = torch.cat([torch.arange(0, 30), torch.arange(30, 36), torch.arange(60, 90)])  # class 1 is rare
    x, y = x[keep], y[keep]
    vx, vy = blobs(seed=1)
    cfg = HeadConfig(epochs=3, lr=0.01, class_weight="balanced")
    result = train_head(x, y, vx, vy, 3, cfg, CPU, seed=0)
    probe = build_probe("linear", {"epochs": 3, "lr": 0.01, "class_weight": "balanced"}, num_classes=3).fit(x, y, vx, vy)
    assert torch.allclose(result.state_dict["weight"], probe.model.weight, atol=1e-6)
    plain = train_head(x, y, vx, vy, 3, HeadConfig(epochs=3, lr=0.01), CPU, seed=0)
    assert not torch.allclose(result.state_dict["weight"], plain.state_dict["weight"], atol=1e-4)


def test_every_head_type_trains_saves_and_predicts_like_it_scored(tiny_cfg, image_root, params_file, capsys):
    """mlp, knn and ncm from one cache: head.pt rebuilt by predict and report, val predictions, ledger lines."""
    import csv

    import run_pipeline
    from pipeline.ledger import read_ledger
    from pipeline.predictor import load_predictor
    from pipeline.report import run_report

    for head_type in ("mlp", "knn", "ncm"):
        cfg = tiny_cfg(f"head.type={head_type}", f"run.name={head_type}", "head.hidden=16", "head.k=3")
        entry = run_head(cfg, CPU)
        ckpt = load_checkpoint(cfg.run_dir / "head.pt")
        assert ckpt["head_type"] == head_type and ckpt["state_dict"]["head_type"] == head_type
        assert entry["head_type"] == head_type and {"val_acc_top1", "mean_per_class_acc"} <= set(entry)
        assert ("best_epoch" in entry) == (head_type == "mlp")
        val = fc.read_cache(ckpt["cache_file"]).val
        probs = load_predictor(cfg.run_dir, "head", CPU, with_backbone=False).probs_from_features(val.features)
        assert np.mean(probs.argmax(1) == val.labels) == pytest.approx(entry["val_acc"])
        assert run_report(cfg, CPU)["head"]["val_acc_top1"] == pytest.approx(entry["val_acc"])
        rows = list(csv.DictReader((cfg.run_dir / "head_val_predictions.csv").open()))
        assert [r["path"] for r in rows] == list(val.paths)
        assert all(r["predicted"] in ("ants", "bees") and r["top_k"].count(":") == 2 for r in rows)
        assert isinstance(read_metrics(cfg.run_dir)["head"]["confused_pairs"], list)
    ledger = read_ledger(cfg.run_dir.parent / "ledger.jsonl").entries
    assert [e.head_type for e in ledger] == ["mlp", "knn", "ncm"] and ledger[1].params == {"k": 3}
    assert len({e.cache_key for e in ledger}) == 1 and ledger[0].cache_key == ckpt["cache_key"]
    image = image_root / "val" / "bees" / "img_000.png"   # predict runs the backbone, then the saved ncm head
    capsys.readouterr()
    assert run_pipeline.main(["--params", str(params_file), "--set", "run.name=ncm", "predict", str(image)]) == 0
    assert "1 of 1 images classified" in capsys.readouterr().out


def test_probe_heads_need_the_features_in_memory_and_no_view_bank(tiny_cfg):
    from pipeline import PipelineError

    with pytest.raises(PipelineError, match="head.type 'knn' trains on the clean cached features: set "
                                            "extract.train_views=0"):
        run_head(tiny_cfg("head.type=knn", "extract.train_views=2"), CPU)
    with pytest.raises(PipelineError, match=r"head.max_memory_gb=1e-05 .*head.type 'mlp' needs the features in "
                                            r"memory: raise head.max_memory_gb, or use head.type=linear"):
        run_head(tiny_cfg("head.type=mlp", "head.max_memory_gb=1e-5"), CPU)


@pytest.mark.parametrize("cfg", [HeadConfig(epochs=4), HeadConfig(epochs=5, lr=0.01, weight_decay=1e-3, step_size=2,
                                                                  class_weight="balanced", batch_size=7)])
def test_the_stages_batched_linear_head_trains_the_engines_weights(cfg):
    """In memory, the stage trains head.type=linear through joint.py's batched engine: same init, batch order,
    updates and best epoch as train_head (nn.Linear + torch.optim.SGD + StepLR), to float rounding."""
    assert_batched_trains_the_engines_head(cfg)


def assert_batched_trains_the_engines_head(cfg: HeadConfig, train_acc: bool = False) -> None:
    """train_linear_batched and train_head on blobs: the same weights, best epoch and history (lr, val top-1,
    train loss; train top-1 too when train_acc)."""
    from pipeline.head import train_linear_batched

    x, y = blobs()
    vx, vy = blobs(seed=1)
    torch.manual_seed(7)              # the stage draws the layer from the cache's seed, the batches from run.seed
    engine = train_head(x, y, vx, vy, 3, cfg, CPU, seed=3, head=torch.nn.Linear(16, 3))
    batched = train_linear_batched(x, y, vx, vy, 3, cfg, CPU, seed=3, init_seed=7)
    for name in ("weight", "bias"):
        assert torch.allclose(batched.state_dict[name], engine.state_dict[name], atol=1e-5), name
    assert batched.best_epoch == engine.best_epoch
    for mine, theirs in zip(batched.history, engine.history):
        assert mine["lr"] == pytest.approx(theirs["lr"]) and mine["val_acc"] == pytest.approx(theirs["val_acc"])
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-4)
        if train_acc:
            assert mine["train_acc"] == pytest.approx(theirs["train_acc"], abs=1e-6)


def test_the_stages_linear_head_across_lazy_windows_trains_the_engines_weights(monkeypatch):
    """The head stage's trainer with lazy_sgd windows of 3 steps (blobs' 90 rows in batches of 4 are 23 steps,
    the last of 2 rows: 8 windows, the last of 2 steps) and a per-window Gram: still train_head's weights,
    best epoch and history."""
    from pipeline import lazy_sgd

    monkeypatch.setattr(lazy_sgd, "WINDOW_STEPS", 3)
    monkeypatch.setattr(lazy_sgd, "GRAM_BYTES", 0)
    assert_batched_trains_the_engines_head(HeadConfig(epochs=4, momentum=0.5, weight_decay=1e-2, step_size=3),
                                           train_acc=True)
