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
