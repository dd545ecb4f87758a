import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from pipeline.backbones import (LITE0, BackboneError, build_classifier, build_feature_extractor, build_network,
                                classifier_path, resolve_backbone)
from pipeline.config import BackboneConfig


def spec_of(name, weights="none", image_size=None):
    cfg = BackboneConfig(name=name, weights=weights, image_size=image_size)
    return cfg, resolve_backbone(cfg, seed=0)


@pytest.fixture(scope="module")
def networks():
    """name -> its torchvision network, random weights drawn after torch.manual_seed(0), in eval mode;
    built once per name (VGG11 takes seconds) for the tests that only read it."""
    built = {}

    def get(name: str) -> torch.nn.Module:
        if name not in built:
            cfg, spec = spec_of(name)
            torch.manual_seed(0)
            built[name] = build_network(cfg, spec).eval()
        return built[name]

    return get


def test_preprocessing_comes_from_the_weights():
    assert spec_of("resnet18", "DEFAULT")[1].preprocess.crop_size == 224
    inception = spec_of("inception_v3", "DEFAULT")[1].preprocess
    assert (inception.resize_size, inception.crop_size) == (342, 299)
    vit = spec_of("vit_b_16", "IMAGENET1K_SWAG_E2E_V1")[1].preprocess
    assert (vit.crop_size, vit.interpolation) == (384, "bicubic")


def test_image_size_override_keeps_resize_ratio():
    pre = spec_of("resnet18", "DEFAULT", image_size=112)[1].preprocess
    assert (pre.resize_size, pre.crop_size) == (128, 112)


def test_weights_identity():
    _, enum_spec = spec_of("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert enum_spec.weights_id.startswith("ResNet18_Weights.IMAGENET1K_V1:https://")
    assert spec_of("resnet18", "IMAGENET1K_V1")[1].weights_id == enum_spec.weights_id
    _, lite = spec_of(LITE0, "DEFAULT")
    assert "sha256=" in lite.weights_id and lite.preprocess.mean[0] == pytest.approx(127 / 255)
    assert spec_of("resnet18")[1].weights_id == "none(seed=0)"


def test_unknown_name_lists_supported():
    with pytest.raises(BackboneError, match="not supported; choose efficientnet_lite0 .*resnet18"):
        spec_of("resnet19")


def test_unknown_weights_lists_choices():
    with pytest.raises(BackboneError, match="IMAGENET1K_V1"):
        spec_of("resnet18", "IMAGENET22K")


def test_missing_local_file():
    with pytest.raises(BackboneError, match="is not a file"):
        spec_of("resnet18", "/no/such/file.pth")


def test_download_failure_names_the_fixes(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torchvision.models, "get_model", offline)
    cfg, spec = spec_of("resnet18", "DEFAULT")
    with pytest.raises(BackboneError) as err:
        build_network(cfg, spec)
    text = str(err.value)
    assert "could not download" in text and "resnet18-f37072fd.pth" in text
    assert "backbone.weights" in text and LITE0 in text


def test_local_state_dict_loads_body(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)  # a finetuned file: other class count
    torch.save(source.state_dict(), tmp_path / "mine.pth")
    cfg, spec = spec_of("resnet18", str(tmp_path / "mine.pth"))
    assert spec.weights_id.startswith("file:sha256=")
    net = build_network(cfg, spec)
    assert torch.equal(net.conv1.weight, source.conv1.weight)


def test_local_file_that_does_not_fit(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pth")
    cfg, spec = spec_of("resnet18", str(tmp_path / "bad.pth"))
    with pytest.raises(BackboneError, match="does not fit resnet18"):
        build_network(cfg, spec)


def test_pickled_object_is_refused(tmp_path):
    torch.save({"x": torch.nn.ReLU()}, tmp_path / "evil.pth")  # a module needs full unpickling
    cfg, spec = spec_of("resnet18", str(tmp_path / "evil.pth"))
    with pytest.raises(BackboneError, match="not a loadable state dict"):
        build_network(cfg, spec)


def test_a_checkpoint_wrapping_its_state_dict_is_unwrapped_and_a_bare_tensor_is_refused(tmp_path):
    from pipeline.weight_files import load_state_file

    state = {"fc.weight": torch.ones(2, 3), "fc.bias": torch.zeros(2)}
    for key in ("state_dict", "model"):                       # what training scripts usually save
        torch.save({key: state, "epoch": 7}, tmp_path / f"{key}.pth")
        loaded = load_state_file(str(tmp_path / f"{key}.pth"))
        assert set(loaded) == set(state) and torch.equal(loaded["fc.weight"], state["fc.weight"])
    torch.save(torch.ones(3), tmp_path / "tensor.pth")
    with pytest.raises(BackboneError, match=r"backbone.weights '.*tensor.pth' holds a Tensor, not a state dict"):
        load_state_file(str(tmp_path / "tensor.pth"))


@pytest.mark.parametrize("name, dim, path", [("resnet18", 512, "fc"), ("vgg11", 4096, "classifier.6"),
                                             ("alexnet", 4096, "classifier.6"),
                                             ("squeezenet1_1", 512, "classifier.1"),
                                             ("mobilenet_v3_small", 1024, "classifier.3")])
def test_features_are_the_classifier_input(networks, name, dim, path):
    cfg, spec = spec_of(name, image_size=64)
    net = networks(name)
    assert classifier_path(name, net) == path
    torch.manual_seed(0)
    extractor = build_feature_extractor(cfg, spec)
    assert extractor.feature_dim == dim and not extractor.training
    assert all(not p.requires_grad for p in extractor.parameters())
    feats = extractor(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, dim)


def test_features_equal_penultimate_activations():
    cfg, spec = spec_of("resnet18", image_size=32)
    torch.manual_seed(0)
    net = build_network(cfg, spec).eval()
    torch.manual_seed(0)
    extractor = build_feature_extractor(cfg, spec, fold=False)
    torch.manual_seed(0)
    folded = build_feature_extractor(cfg, spec)  # batch norm folded: equal within float rounding
    x = torch.randn(2, 3, 32, 32)
    captured = {}
    net.fc.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0]))
    with torch.no_grad():
        net(x)
        assert torch.allclose(extractor(x), captured["x"])
        torch.testing.assert_close(folded(x), captured["x"], rtol=1e-4, atol=1e-5)


def test_lite0_real_weights_classify_imagenet_photos():
    """The shipped weights and their preprocessing recognise scikit-learn's bundled photos."""
    from sklearn.datasets import load_sample_images
    from PIL import Image
    from pipeline.data import eval_transform

    cfg, spec = spec_of(LITE0, "DEFAULT")
    net = build_network(cfg, spec).eval()
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    tf = eval_transform(spec.preprocess)
    x = torch.stack([tf(Image.fromarray(img)) for img in load_sample_images().images])
    with torch.inference_mode():
        top = net(x).argmax(1).tolist()
    assert [categories[i] for i in top] == ["palace", "daisy"]


def test_classifier_replacement_includes_inception_aux():
    cfg, spec = spec_of("inception_v3")
    net = build_classifier(cfg, spec, num_classes=3)
    assert net.fc.out_features == 3 and net.AuxLogits.fc.out_features == 3
    cfg, spec = spec_of("squeezenet1_1")
    assert build_classifier(cfg, spec, num_classes=3)(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_a_replaced_hub_weights_file_is_refused(tmp_path, monkeypatch):
    """The cache key names torchvision weights by URL; the URL carries the file's SHA-256 prefix, checked here."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"not the published weights")
    with pytest.raises(BackboneError, match="resnet18-f37072fd.pth' does not match the SHA-256 prefix 'f37072fd'"):
        resolve_backbone(BackboneConfig(name="resnet18", weights="DEFAULT"), seed=0)


@pytest.mark.parametrize("name, size, dim", [("vgg11", 32, 512 * 7 * 7), ("alexnet", 64, 256 * 6 * 6)])
def test_conv_cut_is_exactly_the_dense_classifier_input(networks, name, size, dim):
    cfg = BackboneConfig(name=name, weights="none", image_size=size, cut="conv")
    spec = resolve_backbone(cfg, seed=0)
    assert spec.cut == "conv" and spec.to_dict()["cut"] == "conv"
    net = networks(name)  # the same seed-0 network: a torchvision model's build ignores the cut and the size
    torch.manual_seed(0)
    extractor = build_feature_extractor(cfg, spec)
    assert extractor.feature_dim == dim
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = extractor(x)
        assert feats.shape == (2, dim)
        assert torch.allclose(net.classifier(feats), net(x), atol=1e-5)  # classifier(features) is the model


def test_dense_classifier_keeps_pretrained_layers_and_dropout():
    from pipeline.backbones import dense_classifier

    cfg, spec = spec_of("vgg11", image_size=32)
    torch.manual_seed(0)
    net = build_network(cfg, spec)
    fc6 = net.classifier[0].weight.clone()
    head = dense_classifier("vgg11", net, num_classes=3)
    assert torch.equal(head[0].weight, fc6)
    assert sum(isinstance(m, torch.nn.Dropout) for m in head) == 2
    assert head[6].out_features == 3 and head[6].in_features == 4096


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_conv_cut_elsewhere_names_the_key_and_the_models(name):
    with pytest.raises(BackboneError, match="backbone.cut 'conv' needs .*alexnet, vgg11.*use backbone.cut=pool"):
        resolve_backbone(BackboneConfig(name=name, weights="none", cut="conv"), seed=0)


@pytest.mark.parametrize("name, resize, crop", [("efficientnet_lite0", 256, 224), ("efficientnet_lite1", 272, 240),
                                                ("efficientnet_lite2", 292, 260)])
def test_lite_models_preprocess_at_their_native_size(name, resize, crop):
    pre = spec_of(name, "DEFAULT")[1].preprocess
    assert (pre.resize_size, pre.crop_size) == (resize, crop)  # TF's eval crop: image_size / (image_size + 32)
    assert pre.mean[0] == pytest.approx(127 / 255) and pre.std[0] == pytest.approx(128 / 255)
    small = spec_of(name, "DEFAULT", image_size=128)[1].preprocess
    assert small.crop_size == 128 and small.resize_size == round(128 * resize / crop)


def test_lite_weights_are_each_models_own_file():
    ids = {spec_of(n, "DEFAULT")[1].weights_id.split(":")[0] for n in ("efficientnet_lite1", "efficientnet_lite2")}
    assert ids == {"efficientnet-lite1-77cc7160.pth", "efficientnet-lite2-9656183e.pth"}


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_real_weights_recognise_palace_and_daisies(name):
    """Their shipped weights load into the right architecture: scikit-learn's palace photo, and the
    demo's 20 val daisies (ImageNet has a 'daisy' class; measured: 15 and 16 of 20, Lite0 17)."""
    from sklearn.datasets import load_sample_images
    from PIL import Image
    from pipeline.data import FLOWERS_DIR, eval_transform

    cfg, spec = spec_of(name, "DEFAULT")
    net = build_network(cfg, spec).eval()
    categories = torchvision.models.ResNet18_Weights.DEFAULT.meta["categories"]
    tf = eval_transform(spec.preprocess)
    daisies = sorted((FLOWERS_DIR / "val" / "daisy").glob("*.jpg"))
    images = [Image.fromarray(load_sample_images().images[0])] + [Image.open(p).convert("RGB") for p in daisies]
    x = torch.stack([tf(img) for img in images])
    assert x.shape[-1] == spec.preprocess.crop_size and len(daisies) == 20
    with torch.inference_mode():
        top = [categories[i] for i in net(x).argmax(1).tolist()]
    assert top[0] == "palace" and top[1:].count("daisy") >= 13


def test_local_safetensors_file_for_torchvision(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = torchvision.models.resnet18(num_classes=7)
    save_file(source.state_dict(), str(tmp_path / "mine.safetensors"))
    cfg, spec = spec_of("resnet18", str(tmp_path / "mine.safetensors"))
    assert spec.weights_id.startswith("file:sha256=")
    net = build_network(cfg, spec)
    assert torch.equal(net.conv1.weight, source.conv1.weight) and net.fc.out_features == 1000
    save_file(torchvision.models.resnet18().state_dict(), str(tmp_path / "fits.safetensors"))
    cfg, spec = spec_of("resnet18", str(tmp_path / "fits.safetensors"))
    net = build_network(cfg, spec)                                  # assigned (build_loaded), not copied
    expected = net.conv1.weight.detach().clone()
    with open(tmp_path / "fits.safetensors", "r+b") as f:           # every tensor zeroed in place
        start = 8 + int.from_bytes(f.read(8), "little")             # past the 8-byte length and the header
        size = f.seek(0, 2)
        f.seek(start)
        f.write(bytes(size - start))
    assert torch.equal(net.conv1.weight, expected)                  # the network never reads the file again


@pytest.mark.parametrize("override", ["backbone.weights=null", "backbone.weights=None", "backbone.weights=none"])
def test_null_and_None_mean_random_weights(override, capsys):
    from pipeline.config import load_config

    cfg = load_config(None, ["backbone.name=resnet18", override, "backbone.image_size=32"]).backbone
    spec = resolve_backbone(cfg, seed=0)
    assert cfg.weights == "none" and spec.weights_id == "none(seed=0)"
    build_feature_extractor(cfg, spec)
    out = capsys.readouterr().out
    assert out.count("features carry no pretraining") == 1 and "resnet18 with random weights" in out


def test_missing_weights_are_downloaded_or_fail_before_anything_else(monkeypatch, tmp_path):
    from pipeline.backbones import ensure_weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    fetched = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, prefix, progress: fetched.append((url, Path(dst).name, prefix)))
    ensure_weights(BackboneConfig(name="resnet18", weights="DEFAULT"))
    assert fetched == [(torchvision.models.ResNet18_Weights.DEFAULT.url, "resnet18-f37072fd.pth", "f37072fd")]

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneError, match="could not download the weights of resnet18 .*Name or service"):
        ensure_weights(BackboneConfig(name="resnet18", weights="DEFAULT"))
    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"x")  # present: nothing to do
    ensure_weights(BackboneConfig(name="resnet18", weights="DEFAULT"))


def test_local_file_with_a_wrong_shaped_tensor_is_one_line(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 5, 5)  # 7x7 in resnet18
    torch.save(state, tmp_path / "shape.pth")
    cfg, spec = spec_of("resnet18", str(tmp_path / "shape.pth"))
    with pytest.raises(BackboneError, match=r"does not fit resnet18: .*size mismatch for conv1.weight"):
        build_network(cfg, spec)


def test_a_fitting_local_file_is_assigned_without_running_the_random_init(tmp_path, real_inits):
    torch.manual_seed(1)
    source = torchvision.models.resnet18().eval()
    half = {k: v.half() if v.is_floating_point() else v for k, v in source.state_dict().items()}
    torch.save(half, tmp_path / "half.pth")                # stored in float16: loaded as the model's float32
    cfg, spec = spec_of("resnet18", str(tmp_path / "half.pth"))
    calls = real_inits
    calls.clear()                                    # the inits above drew the file's weights
    net = build_network(cfg, spec).eval()
    assert calls == []
    assert all(t.dtype == s.dtype and not t.is_meta for t, s in zip(net.state_dict().values(), source.state_dict().values()))
    for k, v in net.state_dict().items():
        assert torch.equal(v, half[k].to(v.dtype)), k
    x = torch.randn(2, 3, 64, 64)
    reference = torchvision.models.resnet18().eval()
    reference.load_state_dict(half)
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))


def test_a_file_that_leaves_the_classifier_out_is_built_for_real(tmp_path, real_inits):
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "seven.pth")
    cfg, spec = spec_of("resnet18", str(tmp_path / "seven.pth"))
    calls = real_inits
    calls.clear()                                    # the inits above drew the file's weights
    net = build_network(cfg, spec, seed=3)
    assert calls and not any(t.is_meta for t in net.state_dict().values())
    torch.manual_seed(3)
    assert torch.equal(net.fc.weight, torchvision.models.resnet18().fc.weight)   # the seeded init, as before


def test_build_loaded_falls_back_where_the_meta_build_leaves_something_unset():
    from pipeline.weight_files import build_loaded

    class Buffered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(3.0), persistent=False)   # not in any state dict

    class Computing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rate = torch.linspace(0, 1, 3)[1].item()    # cannot run on the meta device
            self.lin = torch.nn.Linear(2, 2)

    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.again = self.lin                             # one layer under two names: tied weights

    state = {"lin.weight": torch.ones(2, 2), "lin.bias": torch.zeros(2)}
    how = []

    def load(net, assign):
        how.append(assign)
        net.load_state_dict(state, strict=False, assign=assign)

    for cls, tries in ((Buffered, [True, False]), (Tied, [False]), (Computing, [False])):
        how.clear()
        net = build_loaded(cls, load)
        assert how == tries and torch.equal(net.lin.weight, state["lin.weight"])
        if cls is Tied:
            assert net.again.weight is net.lin.weight
    assert net.rate == 0.5
    assert torch.equal(build_loaded(Buffered, load).table, torch.arange(3.0))

    def refuse(net, assign):
        raise BackboneError("backbone.weights 'x.pth' does not fit")

    with pytest.raises(BackboneError, match="does not fit"):           # a file that does not fit: raised at once
        build_loaded(Buffered, refuse)
