"""finetune.autocast: training steps under torch.autocast (float16 with a gradient scaler), val in float32."""
import shutil

import pytest
import torch

from pipeline import finetune
from pipeline.artifacts import load_checkpoint
from pipeline.finetune import BEST_SO_FAR_FILE, run_finetune

CPU = torch.device("cpu")


def _watch_dtypes(monkeypatch) -> list:
    """Records (training?, output dtype) of the finetuned network's first convolution on every call."""
    seen, build = [], finetune.build_finetune_model

    def watched(*args, **kwargs):
        model, head_paths = build(*args, **kwargs)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, i, out: seen.append((m.training, out.dtype)))
        return model, head_paths

    monkeypatch.setattr(finetune, "build_finetune_model", watched)
    return seen


def test_bfloat16_autocast_trains_in_bfloat16_keeps_float32_weights_and_scores_val_in_float32(tiny_cfg, monkeypatch,
                                                                                               capsys):
    seen = _watch_dtypes(monkeypatch)
    cfg = tiny_cfg("finetune.epochs=1", "finetune.autocast=bfloat16")
    entry = run_finetune(cfg, CPU)
    assert 0.0 <= entry["val_acc"] <= 1.0 and all(h["train_loss"] > 0 for h in entry["history"])
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}      # val, as predict runs
    ckpt = load_checkpoint(cfg.run_dir / "finetune.pt")
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["scaler"] is None and ckpt["finetune_config"]["autocast"] == "bfloat16"
    assert "bfloat16 autocast" in capsys.readouterr().out


def test_float16_autocast_scales_its_gradients_and_a_resumed_run_carries_the_scaler_on(tiny_cfg, monkeypatch):
    from pipeline import PipelineError

    seen = _watch_dtypes(monkeypatch)
    small = "backbone.name=mobilenet_v3_small"       # float16 convolutions are slow on a CPU: resnet18's 10x
    cfg = tiny_cfg(small, "finetune.epochs=1", "finetune.autocast=float16")
    run_finetune(cfg, CPU)
    assert {dtype for training, dtype in seen if training} == {torch.float16}
    ckpt = load_checkpoint(cfg.run_dir / "finetune.pt")
    assert ckpt["scaler"]["scale"] > 0                              # GradScaler's state, saved with the epoch
    shutil.copyfile(cfg.run_dir / "finetune.pt", cfg.run_dir / BEST_SO_FAR_FILE)   # as if interrupted after epoch 1
    loaded = []
    real_load = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict",
                        lambda self, state: (loaded.append(state["scale"]), real_load(self, state))[1])
    with pytest.raises(PipelineError, match="other data, backbone or finetune settings"):   # not in float32
        run_finetune(tiny_cfg(small, "finetune.epochs=2", "finetune.resume=true"), CPU)
    entry = run_finetune(tiny_cfg(small, "finetune.epochs=2", "finetune.resume=true", "finetune.autocast=float16"), CPU)
    assert loaded == [ckpt["scaler"]["scale"]] and [h["epoch"] for h in entry["history"]] == [1, 2]


# torch warns when an epoch-end StepLR step comes before any optimizer step, as it does when the scaler
# skips every step of the first epoch; the epoch line says what happened instead.
@pytest.mark.filterwarnings("error:Detected call of `lr_scheduler.step\\(\\)`")
def test_an_epoch_whose_steps_the_float16_scaler_all_skipped_says_so_in_its_line_without_torchs_warning(
        tiny_cfg, monkeypatch, capsys):
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, init_scale=2.0 ** 100, **k))  # overflows
    cfg = tiny_cfg("backbone.name=mobilenet_v3_small", "finetune.epochs=1", "finetune.autocast=float16")
    entry = run_finetune(cfg, CPU)
    assert entry["history"][0]["skipped_steps"] == 3                 # 12 train images, batch 4: every step
    out = capsys.readouterr().out
    assert "float16's gradient scaler skipped 3 of 3 steps, whose gradients overflowed (it lowered its scale to" in out


def test_a_file_saved_before_autocast_existed_resumes_in_float32(tiny_cfg):
    cfg = tiny_cfg("finetune.epochs=1")
    run_finetune(cfg, CPU)
    old = torch.load(cfg.run_dir / "finetune.pt", weights_only=True)
    del old["finetune_config"]["autocast"]                                  # what an earlier version wrote
    old.pop("scaler")
    torch.save(old, cfg.run_dir / BEST_SO_FAR_FILE)
    entry = run_finetune(tiny_cfg("finetune.epochs=2", "finetune.resume=true"), CPU)
    assert [h["epoch"] for h in entry["history"]] == [1, 2]
