import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.artifacts import load_checkpoint
from pipeline.config import load_config
from pipeline.engine import compute_loss
from pipeline.finetune import FinetuneJob, run_finetune
from pipeline.metrics import read_metrics
from tests.conftest import make_image_folder, tiny_overrides

CPU = torch.device("cpu")


# One model per classifier shape: fc (resnet18), a dense classifier whose last Linear is replaced
# (alexnet: VGG11's shape, with 61M parameters to its 133M; VGG11's own dense layers are trained in
# tests/test_head.py), and inception_v3's auxiliary head.
@pytest.mark.parametrize("name, image_size", [("resnet18", 32), ("alexnet", 64), ("inception_v3", None)])
def test_finetune_trains_and_checkpoints(tmp_path, name, image_size):
    root = make_image_folder(tmp_path / "imgs", n_train=2, n_val=1, size=24)
    cfg = load_config(None, tiny_overrides(tmp_path, root) + [
        f"backbone.name={name}", f"backbone.image_size={'null' if image_size is None else image_size}",
        "finetune.epochs=2", "finetune.batch_size=2", "finetune.augment=true"])
    entry = run_finetune(cfg, CPU)
    assert 0.0 <= entry["val_acc"] <= 1.0 and entry["best_epoch"] in (1, 2)
    assert entry["test_acc"] is None and entry["selected_on"] == "val (best epoch)"  # no test/: nothing scored
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
    model, head_paths = build_finetune_model(FinetuneJob.of(cfg), resolve_backbone(cfg.backbone, 0), ("ants", "bees"))
    assert head_paths == ["fc"]
    assert torch.equal(model.fc.weight, head["weight"]) and torch.equal(model.fc.bias, head["bias"])
    fresh, _ = build_finetune_model(FinetuneJob.of(tiny_cfg()), resolve_backbone(cfg.backbone, 0), ("ants", "bees"))
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
    model, head_paths = build_finetune_model(FinetuneJob.of(cfg), resolve_backbone(cfg.backbone, 0), ("ants", "bees"))
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


# ----------------------------------------------------------------------------- the model file as a record
def _finetune_file(path, **changes) -> dict:
    """A finetune model file as this tool writes it (ModelArtifact), with changes; None deletes a key."""
    from pipeline.records import ModelArtifact

    d = ModelArtifact("finetune", ["ants", "bees"], {"w": torch.zeros(1)}, {"lr": 0.1},
                      {"name": "resnet18", "weights_id": "none(seed=0)", "preprocess": {}},
                      {"name": "resnet18", "weights": "none", "image_size": 32, "cut": "pool"}, 0, "imgs",
                      extra={"epoch": 1, "val_acc": 0.5, "optimizer": {}, "scheduler": {}}).to_dict()
    d.update(changes)
    d = {k: v for k, v in d.items() if v is not None}
    torch.save(d, path)
    return d


def test_finetune_files_are_versioned_records_and_old_ones_still_load(tmp_path):
    from pipeline.finetune import read_finetune_file
    from pipeline.records import RECORD_VERSION

    written = _finetune_file(tmp_path / "finetune.pt")
    assert written["record_version"] == RECORD_VERSION and written["kind"] == "finetune"
    back = read_finetune_file(tmp_path / "finetune.pt")
    assert back.record_version == RECORD_VERSION and back.extra["epoch"] == 1 and back.classes == ["ants", "bees"]
    _finetune_file(tmp_path / "old.pt", record_version=None)  # written before records: the same keys, no version
    old = read_finetune_file(tmp_path / "old.pt")
    assert old.record_version == 0 and torch.equal(old.weights["w"], torch.zeros(1))


def test_a_newer_or_renamed_finetune_file_fails_naming_the_file_and_version(tmp_path):
    from pipeline.finetune import read_finetune_file
    from pipeline.records import RecordError

    _finetune_file(tmp_path / "new.pt", record_version=99)
    with pytest.raises(RecordError, match=r"new.pt' was written by a newer version .*record version 99; "
                                          r"this one reads versions up to 1"):
        read_finetune_file(tmp_path / "new.pt")
    _finetune_file(tmp_path / "renamed.pt", epoch=None, best_epoch=1)
    with pytest.raises(RecordError, match=r"renamed.pt' \(record version 1\) lacks epoch: run the finetune stage"):
        read_finetune_file(tmp_path / "renamed.pt")


def test_resuming_from_a_newer_best_so_far_file_fails_before_training(tiny_cfg):
    from pipeline import PipelineError
    from pipeline.finetune import BEST_SO_FAR_FILE

    cfg = tiny_cfg("finetune.resume=true", "finetune.epochs=2")
    cfg.run_dir.mkdir(parents=True)
    _finetune_file(cfg.run_dir / BEST_SO_FAR_FILE, record_version=99)
    with pytest.raises(PipelineError, match=r"best-so-far.pt' was written by a newer version .*record version 99"):
        run_finetune(cfg, CPU)
    assert not (cfg.run_dir / "finetune.pt").exists()


def test_resuming_after_the_split_settings_changed_fails_naming_them(tiny_cfg):
    from pipeline import PipelineError
    from pipeline.backbones import resolve_backbone
    from pipeline.data import load_image_folder
    from pipeline.finetune import BEST_SO_FAR_FILE, data_split, resume_checkpoint
    from pipeline.records import ModelArtifact

    job = FinetuneJob.of(tiny_cfg("finetune.resume=true", "finetune.epochs=2"))
    spec, data = resolve_backbone(job.backbone, job.seed), load_image_folder(str(job.data.root))
    job.run_dir.mkdir(parents=True)

    def saved(split: dict) -> None:
        torch.save(ModelArtifact("finetune", list(data.classes), {"w": torch.zeros(1)}, dataclasses.asdict(job.finetune),
                                 spec.to_dict(), dataclasses.asdict(job.backbone), job.seed, str(data.root),
                                 extra={"epoch": 1, "val_acc": 0.5, "optimizer": {}, "scheduler": {},
                                        "data_split": split}).to_dict(), job.run_dir / BEST_SO_FAR_FILE)

    saved(data_split(job.data))
    assert resume_checkpoint(job, spec, data).extra["epoch"] == 1  # the same split: it resumes
    saved({**data_split(job.data), "val_fraction": 0.2})
    with pytest.raises(PipelineError, match=r"another val/test split \(data.val_fraction 0.2 -> None\)"):
        resume_checkpoint(job, spec, data)


def test_resume_checkpoint_says_what_to_do_in_each_case(tiny_cfg, capsys):
    """No resume with a best-so-far file: starting over, said; resume with none, or from a finetune with
    other settings, or already at finetune.epochs: one line each naming the file and the fix."""
    from pipeline import PipelineError
    from pipeline.backbones import resolve_backbone
    from pipeline.data import load_image_folder
    from pipeline.finetune import BEST_SO_FAR_FILE, data_split, resume_checkpoint
    from pipeline.records import ModelArtifact

    def job_of(*extra):
        return FinetuneJob.of(tiny_cfg("finetune.epochs=2", *extra))

    job = job_of("finetune.resume=true")
    spec, data = resolve_backbone(job.backbone, job.seed), load_image_folder(str(job.data.root))
    path = job.run_dir / BEST_SO_FAR_FILE
    with pytest.raises(PipelineError, match=r"finetune.resume is true but there is no '.*best-so-far.pt'.*run without"):
        resume_checkpoint(job, spec, data)
    job.run_dir.mkdir(parents=True)

    def saved(epoch: int) -> None:
        torch.save(ModelArtifact("finetune", list(data.classes), {"w": torch.zeros(1)}, dataclasses.asdict(job.finetune),
                                 spec.to_dict(), dataclasses.asdict(job.backbone), job.seed, str(data.root),
                                 extra={"epoch": epoch, "val_acc": 0.5, "optimizer": {}, "scheduler": {},
                                        "data_split": data_split(job.data)}).to_dict(), path)

    saved(1)
    assert resume_checkpoint(job_of(), spec, data) is None
    assert f"finetune: '{path}' holds the best epoch of an interrupted finetune; starting over" in capsys.readouterr().out
    with pytest.raises(PipelineError, match="was saved by a finetune with other data, backbone or finetune settings"):
        resume_checkpoint(job_of("finetune.resume=true", "finetune.lr=0.5"), spec, data)
    saved(2)
    with pytest.raises(PipelineError, match=r"is already at epoch 2 of finetune.epochs=2: raise finetune.epochs"):
        resume_checkpoint(job, spec, data)
    assert resume_checkpoint(job_of("finetune.resume=true", "finetune.epochs=3"), spec, data).extra["epoch"] == 2


def test_init_head_cached_needs_a_linear_head_on_these_classes(tiny_cfg, tmp_path):
    from pipeline import PipelineError
    from pipeline.head import run_head

    run_head(tiny_cfg("head.type=ncm"), CPU)
    with pytest.raises(PipelineError, match="is a ncm head, which cannot sit in the network: train a linear head"):
        run_finetune(tiny_cfg("finetune.init_head=cached"), CPU)
    other = make_image_folder(tmp_path / "other", classes=("cats", "dogs"), n_train=2, n_val=1)
    run_head(load_config(None, tiny_overrides(tmp_path, other) + ["head.epochs=1"]), CPU)   # same run folder
    with pytest.raises(PipelineError, match=r"predicts \['cats', 'dogs'\] but the data has \['ants', 'bees'\]"):
        run_finetune(tiny_cfg("finetune.init_head=cached"), CPU)


def test_the_new_layers_are_seeded_by_the_build_not_by_the_caller(tiny_cfg):
    from pipeline.backbones import resolve_backbone
    from pipeline.finetune import build_finetune_model

    job = FinetuneJob.of(tiny_cfg())
    spec = resolve_backbone(job.backbone, job.seed)
    torch.manual_seed(123)
    a, _ = build_finetune_model(job, spec, ("ants", "bees"))
    after_a = torch.rand(1)
    torch.manual_seed(123)
    torch.rand(5)  # whatever the global generator went through before
    b, _ = build_finetune_model(job, spec, ("ants", "bees"))
    assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(a.conv1.weight, b.conv1.weight)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_a)  # the build left the caller's generator as it was
    other, _ = build_finetune_model(FinetuneJob.of(tiny_cfg("run.seed=1")), resolve_backbone(job.backbone, 1),
                                    ("ants", "bees"))
    assert not torch.equal(other.fc.weight, a.fc.weight)


def test_finetune_chooses_on_val_and_scores_the_kept_epoch_once_on_test(tmp_path, monkeypatch, capsys):
    from pipeline import selection
    from pipeline.data import eval_transform, load_dataset, load_image
    from pipeline.predictor import load_predictor
    from tests.test_folders import make_layout

    root = make_layout(tmp_path / "d", "val", n_train=2, n_val=1, n_test=2)
    cfg = load_config(None, tiny_overrides(tmp_path, root) + ["finetune.batch_size=8"])
    calls = []
    real = selection.score_proba
    monkeypatch.setattr(selection, "score_proba", lambda y, p: calls.append(len(y)) or real(y, p))
    entry = run_finetune(cfg, CPU)
    assert calls == [4]  # once, on the 4 test images, after the best epoch was chosen on val
    assert "finetune: test top-1" in capsys.readouterr().out
    assert entry["selected_on"] == "val (best epoch)" and entry["n_test"] == 4
    assert read_metrics(cfg.run_dir)["finetune"]["test_acc"] == entry["test_acc"]
    # the figure is the kept (published) model's accuracy on the test images
    predictor = load_predictor(cfg.run_dir, "finetune", CPU)
    test = load_dataset(cfg.data).test
    pre = eval_transform(predictor.preprocess)
    x = torch.stack([pre(load_image(root / p)) for p in test.paths])
    predicted = predictor.probs_from_images(x).argmax(1)
    assert entry["test_acc"] == float((predicted == np.asarray(test.labels)).mean())
