"""timm backbones (pipeline/timm_backbones.py) on timm's tiny test models with random or local weights."""
import dataclasses

from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from pipeline.backbones import (BackboneError, build_classifier, build_feature_extractor,  # noqa: E402
                                build_network, classifier_path, resolve_backbone)
from pipeline.config import BackboneConfig  # noqa: E402
from pipeline.timm_backbones import TimmError, ensure_weights  # noqa: E402

CPU = torch.device("cpu")
TINY = "timm/test_resnet"  # 0.47 M parameters, a 96-wide pooled feature


def spec_of(name=TINY, weights="none", image_size=None):
    cfg = BackboneConfig(name=name, weights=weights, image_size=image_size)
    return cfg, resolve_backbone(cfg, seed=0)


def test_preprocessing_comes_from_the_pretrained_config():
    pcfg = timm.models.get_pretrained_cfg("convnext_tiny.fb_in22k")  # 224 px, crop_pct 0.875, bicubic
    pre = spec_of("timm/convnext_tiny.fb_in22k", "DEFAULT")[1].preprocess
    assert (pre.resize_size, pre.crop_size, pre.interpolation) == (256, 224, pcfg.interpolation)
    assert pre.mean == pytest.approx(pcfg.mean) and pre.std == pytest.approx(pcfg.std)
    dino = spec_of("timm/vit_small_patch14_dinov2.lvd142m", "DEFAULT")[1].preprocess
    assert (dino.resize_size, dino.crop_size) == (518, 518)  # crop_pct 1.0
    small = spec_of(TINY, "none", image_size=32)[1].preprocess
    assert small.crop_size == 32 and small.resize_size == round(32 * 168 / 160)  # 160 px at crop_pct 0.95


def test_weights_identity_covers_source_file_and_timm_version(tmp_path):
    _, hub = spec_of("timm/resnet50.a1_in1k", "DEFAULT")
    assert hub.weights_id.startswith("hf-hub:timm/resnet50.a1_in1k;timm=")
    assert spec_of()[1].weights_id.startswith("none(seed=0);timm=")
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file({"x": torch.zeros(2)}, str(path))
    first = spec_of(weights=str(path))[1].weights_id
    safetensors_torch.save_file({"x": torch.ones(2)}, str(path))
    assert first.startswith("file:sha256=") and spec_of(weights=str(path))[1].weights_id != first


@pytest.mark.parametrize("name, message", [
    ("timm/resnet5O", "is not a timm model .*close matches: timm/resnet50"),
    ("timm/resnet50.no_such_tag", "no weights tagged 'no_such_tag' for resnet50; choose one of timm/resnet50.a1_in1k"),
])
def test_unknown_names_say_what_exists(name, message):
    with pytest.raises(TimmError, match=message):
        spec_of(name)


def test_unknown_weights_word_names_the_choices():
    with pytest.raises(TimmError, match="use DEFAULT .* a local .safetensors / .pth / .bin file, or none"):
        spec_of(TINY, "IMAGENET1K_V1")


@pytest.mark.parametrize("name", [TINY, "timm/test_vit", "timm/test_efficientnet"])
def test_features_are_the_pooled_pre_logits(name):
    cfg, spec = spec_of(name, image_size=64)
    torch.manual_seed(0)
    net = build_network(cfg, spec).eval()
    torch.manual_seed(0)
    extractor = build_feature_extractor(cfg, spec)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = extractor(x)
        assert feats.shape == (2, extractor.feature_dim)
        expected = net.forward_head(net.forward_features(x), pre_logits=True)
        assert torch.allclose(feats, expected, atol=1e-5)
        assert torch.allclose(net.get_classifier()(feats), net(x), atol=1e-4)  # classifier(features) is the model
    assert not any(p.requires_grad for p in extractor.parameters())


def test_classifier_is_reset_for_finetuning():
    cfg, spec = spec_of("timm/test_convnext", image_size=32)
    model = build_classifier(cfg, spec, num_classes=3)
    assert classifier_path(cfg.name, model) == "head.fc"
    assert model.get_submodule("head.fc").out_features == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_local_safetensors_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(source.state_dict(), str(path))
    cfg, spec = spec_of(weights=str(path), image_size=32)
    torch.manual_seed(2)  # a different draw: only the file can make the weights equal
    net = build_network(cfg, spec)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), source.state_dict().values()))
    assert all(t.data_ptr() % 64 == 0 for t in net.state_dict().values())   # as a real build allocates them


def test_damaged_safetensors_file_is_one_line(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"not a safetensors file")
    cfg, spec = spec_of(weights=str(path))
    with pytest.raises(BackboneError, match="model.safetensors' is not a loadable .safetensors state dict"):
        build_network(cfg, spec)


def test_offline_default_fails_naming_the_fixes(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                      "cannot find the requested files in the local cache.")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr("pipeline.timm_backbones._hub_cached", lambda repo_id: None)
    with pytest.raises(TimmError) as err:
        ensure_weights("timm/resnet50.a1_in1k", "DEFAULT")
    text = str(err.value)
    assert text.startswith("could not download the weights of timm/resnet50.a1_in1k (hf-hub:timm/resnet50.a1_in1k)")
    assert "Hugging Face cache" in text and "--set backbone.weights=/path/to/model.safetensors" in text
    assert "--set backbone.name=efficientnet_lite0" in text
    assert calls == [("timm/resnet50.a1_in1k", "model.safetensors")]  # offline: not retried per file name
    cfg, spec = spec_of("timm/resnet50.a1_in1k", "DEFAULT")
    with pytest.raises(TimmError, match="could not download"):
        build_network(cfg, spec)


def test_pipeline_on_a_tiny_timm_model(tiny_cfg, tmp_path, capsys):
    """extract + head + finetune + predict + report, end to end, on timm's test_resnet."""
    from pipeline.extract import run_extract
    from pipeline.finetune import run_finetune
    from pipeline.head import run_head
    from pipeline.predict import run_predict

    overrides = [f"backbone.name={TINY}", "backbone.weights=null", "head.lr=0.01"]
    cfg = tiny_cfg(*overrides)
    extract = run_extract(cfg, CPU)
    cache_file = Path(extract["cache_file"])  # cache/<data>.<backbone>-<key>.h5, "/" in the name as "-"
    assert not extract["cache_hit"] and cache_file.parent == tmp_path / "cache" and ".timm-test_resnet-" in cache_file.name
    assert "features carry no pretraining" in capsys.readouterr().out
    head = run_head(cfg, CPU)
    finetune = run_finetune(cfg, CPU)
    assert 0 <= head["val_acc"] <= 1 and 0 <= finetune["val_acc"] <= 1
    assert run_extract(cfg, CPU)["cache_hit"]
    image = str(tmp_path / "imgs" / "val" / "bees" / "img_000.png")
    for model in ("head", "finetune"):
        pcfg = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, model=model))
        (row,) = run_predict(pcfg, CPU, [image])
        assert row.ok and sum(p for _, p in row.top) == pytest.approx(1.0, abs=1e-5)
    from pipeline.report import run_report

    reports = run_report(cfg, CPU)  # rebuilds the timm backbone (head) and network (finetune) from the artifacts
    assert reports["head"]["val_acc_top1"] == pytest.approx(head["val_acc"])
    assert reports["finetune"]["val_acc_top1"] == pytest.approx(finetune["val_acc"])


# That other backbones import no timm (resolve_backbone + build_feature_extractor of resnet18) is checked
# by tests/test_imports.py, in the one interpreter that probes every stage's imports.


@pytest.fixture
def hub_weights(monkeypatch, tmp_path):
    """put(name) writes a state dict for timm's `name` where timm's Hub download finds it (no network)."""
    import timm.models._hub as timm_hub

    files = {}
    monkeypatch.setattr(timm_hub, "hf_hub_download", lambda repo_id, filename=None, **kwargs: files[repo_id])
    monkeypatch.setattr("pipeline.timm_backbones._hub_cached", lambda repo_id: files.get(repo_id))

    def put(name, dtype=torch.float32):
        torch.manual_seed(1)
        state = {k: v.to(dtype) if v.is_floating_point() else v
                 for k, v in timm.create_model(name.split(".")[0]).state_dict().items()}
        path = tmp_path / f"{name}.safetensors"
        safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        files[timm.models.get_pretrained_cfg(name).hf_hub_id] = str(path)
        return state
    return put


@pytest.mark.parametrize("size", [160, 128])   # 128: timm's checkpoint filter resamples the position embeddings
def test_default_weights_are_assigned_without_the_random_init(hub_weights, monkeypatch, size):
    state = hub_weights("test_vit.r160_in1k")
    devices, create = [], timm.create_model

    def recording(*args, **kwargs):
        devices.append(torch.get_default_device().type)
        return create(*args, **kwargs)
    monkeypatch.setattr(timm, "create_model", recording)
    cfg, spec = spec_of("timm/test_vit.r160_in1k", "DEFAULT", image_size=size)
    net = build_network(cfg, spec).eval()
    assert devices == ["meta"]                                    # built once, on the meta device
    reference = create("test_vit.r160_in1k", pretrained=True, **({} if size == 160 else {"img_size": size})).eval()
    ours, theirs = dict(net.named_buffers()) | net.state_dict(), dict(reference.named_buffers()) | reference.state_dict()
    assert ours.keys() == theirs.keys()
    for k, v in ours.items():
        assert not v.is_meta and v.data_ptr() % 64 == 0 and torch.equal(v, theirs[k]), k
    assert size != 160 or torch.equal(net.pos_embed, state["pos_embed"])
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))                  # aligned as built for real: the same rounding


def test_computed_buffers_are_filled_or_left_for_the_real_build():
    from timm.models.swin_transformer import WindowAttention

    from pipeline.timm_backbones import fill_computed_buffers

    real = WindowAttention(dim=8, num_heads=2, window_size=2)
    with torch.device("meta"):
        meta = WindowAttention(dim=8, num_heads=2, window_size=2)
    fill_computed_buffers(meta)
    assert not meta.relative_position_index.is_meta
    assert torch.equal(meta.relative_position_index, real.relative_position_index)

    class Forgetful(torch.nn.Module):                             # its init leaves one buffer out
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(3), persistent=False)
            self.register_buffer("index", torch.zeros(3, dtype=torch.long), persistent=False)

        def init_non_persistent_buffers(self):
            self.table.copy_(torch.arange(3.0))
    with torch.device("meta"):
        forgetful = Forgetful()
    fill_computed_buffers(forgetful)
    assert forgetful.table.is_meta and forgetful.index.is_meta   # back on meta: build_hub_loaded builds for real


def test_a_float16_checkpoint_gives_the_float32_network_timm_builds(hub_weights):
    hub_weights("test_resnet.r160_in1k", torch.float16)                 # a Hub file stored in half precision
    cfg, spec = spec_of("timm/test_resnet.r160_in1k", "DEFAULT", image_size=160)
    net = build_network(cfg, spec)
    reference = timm.create_model("test_resnet.r160_in1k", pretrained=True)   # copies into float32
    for k, v in net.state_dict().items():
        assert v.dtype == reference.state_dict()[k].dtype and torch.equal(v, reference.state_dict()[k]), k
    assert {p.dtype for p in net.parameters()} == {torch.float32}
