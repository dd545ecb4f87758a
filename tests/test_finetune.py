import pytest
import torch
from torch import nn

from pipeline.artifacts import load_checkpoint
from pipeline.config import load_config
from pipeline.engine import compute_loss
from pipeline.finetune import run_finetune
from pipeline.metrics import read_metrics
from tests.conftest import make_image_folder, tiny_overrides

CPU = torch.device("cpu")


@pytest.mark.parametrize("name, image_size", [("resnet18", 32), ("vgg11", 32), ("inception_v3", None)])
def test_finetune_trains_and_checkpoints(tmp_path, name, image_size):
    root = make_image_folder(tmp_path / "imgs", n_train=2, n_val=1, size=24)
    cfg = load_config(None, tiny_overrides(tmp_path, root) + [
        f"backbone.name={name}", f"backbone.image_size={'null' if image_size is None else image_size}",
        "finetune.epochs=2", "finetune.batch_size=2", "finetune.augment=true"])
    entry = run_finetune(cfg, CPU)
    assert 0.0 <= entry["val_acc"] <= 1.0 and entry["best_epoch"] in (1, 2)
    assert [h["epoch"] for h in entry["history"]] == [1, 2]
    assert all(h["train_loss"] > 0 for h in entry["history"])
    ckpt = load_checkpoint(cfg.run_dir / "finetune.pt")
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "epoch", "classes", "backbone_config"}
    assert ckpt["epoch"] == entry["best_epoch"]
    assert read_metrics(cfg.run_dir)["finetune"]["val_acc"] == entry["val_acc"]
    assert not (tmp_path / "cache").exists()  # finetuning never touches the feature cache
    if name == "inception_v3":
        assert ckpt["model"]["AuxLogits.fc.weight"].shape == (2, 768)
        assert ckpt["backbone_config"]["image_size"] is None


def test_finetune_changes_the_backbone(tiny_cfg):
    from pipeline.backbones import build_network, resolve_backbone

    cfg = tiny_cfg("finetune.epochs=1", "finetune.lr=0.01")
    run_finetune(cfg, CPU)
    tuned = load_checkpoint(cfg.run_dir / "finetune.pt")["model"]
    torch.manual_seed(cfg.run.seed)
    initial = build_network(cfg.backbone, resolve_backbone(cfg.backbone, cfg.run.seed)).state_dict()
    assert not torch.equal(tuned["conv1.weight"], initial["conv1.weight"])


def test_auxiliary_loss_is_weighted():
    criterion = nn.CrossEntropyLoss()
    y = torch.tensor([0, 1])
    main, aux = torch.randn(2, 3), torch.randn(2, 3)
    loss, logits = compute_loss((main, aux), y, criterion)
    assert torch.allclose(loss, criterion(main, y) + 0.4 * criterion(aux, y))
    assert logits is main
    aux1 = torch.randn(2, 3)
    loss, _ = compute_loss((main, aux, aux1), y, criterion)
    assert torch.allclose(loss, criterion(main, y) + 0.3 * (criterion(aux, y) + criterion(aux1, y)))


def test_init_head_cached_starts_from_head_pt(tiny_cfg):
    from pipeline.backbones import resolve_backbone
    from pipeline.finetune import build_finetune_model
    from pipeline.head import run_head

    run_head(tiny_cfg("head.epochs=2"), CPU)
    head = load_checkpoint(tiny_cfg().run_dir / "head.pt")["state_dict"]
    cfg = tiny_cfg("finetune.init_head=cached")
    model, head_paths = build_finetune_model(cfg, resolve_backbone(cfg.backbone, 0), ("ants", "bees"))
    assert head_paths == ["fc"]
    assert torch.equal(model.fc.weight, head["weight"]) and torch.equal(model.fc.bias, head["bias"])
    fresh, _ = build_finetune_model(tiny_cfg(), resolve_backbone(cfg.backbone, 0), ("ants", "bees"))
    assert not torch.equal(fresh.fc.weight, head["weight"])


def test_init_head_cached_loads_the_dense_classifier(tmp_path):
    from pipeline.backbones import resolve_backbone
    from pipeline.finetune import build_finetune_model
    from pipeline.head import run_head

    root = make_image_folder(tmp_path / "imgs", n_train=2, n_val=1)
    base = tiny_overrides(tmp_path, root) + ["backbone.name=alexnet", "backbone.image_size=64", "head.epochs=1"]
    run_head(load_config(None, base + ["backbone.cut=conv", "head.type=classifier"]), CPU)
    head = load_checkpoint(tmp_path / "runs" / "t" / "head.pt")["state_dict"]
    cfg = load_config(None, base + ["finetune.init_head=cached"])  # finetuning ignores the cut
    model, head_paths = build_finetune_model(cfg, resolve_backbone(cfg.backbone, 0), ("ants", "bees"))
    assert head_paths == ["classifier"]
    assert all(torch.equal(model.classifier.state_dict()[k], v) for k, v in head.items())


def test_init_head_cached_needs_a_head_for_this_backbone(tiny_cfg):
    from pipeline import PipelineError
    from pipeline.head import run_head

    with pytest.raises(PipelineError, match="finetune.init_head 'cached' starts from .*run the head stage first"):
        run_finetune(tiny_cfg("finetune.init_head=cached"), CPU)
    run_head(tiny_cfg("head.epochs=1"), CPU)
    with pytest.raises(PipelineError, match="was trained on resnet18 features .* not on this backbone"):
        run_finetune(tiny_cfg("finetune.init_head=cached", "backbone.image_size=40"), CPU)


def test_backbone_lr_mult_gives_the_body_a_smaller_rate(tiny_cfg):
    from pipeline.finetune import head_parameter_groups

    cfg = tiny_cfg("finetune.epochs=2", "finetune.lr=0.01", "finetune.backbone_lr_mult=0.1",
                   "finetune.step_size=1", "finetune.gamma=0.5")
    entry = run_finetune(cfg, CPU)
    assert [h["lr"] for h in entry["history"]] == pytest.approx([0.01, 0.005])  # StepLR drops both
    assert [h["backbone_lr"] for h in entry["history"]] == pytest.approx([0.001, 0.0005])
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
    head, body = head_parameter_groups(model, ["2"], lr=0.1, backbone_lr_mult=0.25)
    assert (head["lr"], body["lr"]) == (0.1, 0.025)
    assert [p.shape for p in head["params"]] == [(2, 3), (2,)] and len(body["params"]) == 2
