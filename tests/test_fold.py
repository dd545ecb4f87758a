import pytest
import torch
from torch import nn

from pipeline.backbones import LITE0, build_feature_extractor, resolve_backbone
from pipeline.config import BackboneConfig
from pipeline.fold import conv_bn_pairs, fold_batchnorm


def extractor(name, weights="none", image_size=64):
    cfg = BackboneConfig(name=name, weights=weights, image_size=image_size)
    torch.manual_seed(0)
    return build_feature_extractor(cfg, resolve_backbone(cfg, seed=0), fold=False)


def randomise_bn_statistics(module):
    """Random init leaves mean 0 / var 1 / weight 1 / bias 0, where folding changes nothing; make it count."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def assert_folded_equal(model, x, expected_pairs):
    folded, n = fold_batchnorm(model)
    assert n == expected_pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.inference_mode():
        want, got = model(x), folded(x)
    assert want.abs().max() > 1e-3  # a non-trivial output
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_real_lite0_folded_equals_unfolded():
    model = extractor(LITE0, "DEFAULT", 96)
    x = torch.rand(4, 3, 96, 96) * 2 - 1
    assert_folded_equal(model, x, 49)  # stem, every block's convolutions and the head conv


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_real_lite1_lite2_folded_equal_unfolded(name):
    model = extractor(name, "DEFAULT", 64)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    folded, n = fold_batchnorm(model)
    assert n == len(conv_bn_pairs(model)) > 49  # deeper than Lite0: more blocks, every conv with its BN
    assert_folded_equal(model, x, n)


@pytest.mark.parametrize("name", ["timm/test_efficientnet", "timm/test_resnet"])
def test_timm_folded_equals_unfolded_and_keeps_the_activations(name):
    """timm's BatchNormAct2d is batch norm, then drop, then act: folding must keep the last two."""
    pytest.importorskip("timm")
    model = extractor(name)
    randomise_bn_statistics(model)
    folded, n = fold_batchnorm(model)
    assert n > 0
    assert_folded_equal(model, torch.randn(2, 3, 64, 64), n)


def test_torchvision_resnet18_folded_equals_unfolded():
    model = extractor("resnet18")
    randomise_bn_statistics(model)
    assert_folded_equal(model, torch.randn(3, 3, 64, 64), 20)  # 17 convs + 3 downsample convs


def test_original_module_is_untouched_unless_inplace():
    model = extractor("resnet18")
    fold_batchnorm(model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
    same, _ = fold_batchnorm(model, inplace=True)
    assert same is model and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


class Shared(nn.Module):
    """The conv output also feeds a second branch: folding the BN into it would change that branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y))) + y


class Twice(nn.Module):
    """One BN applied after two convolutions: it cannot be folded into both."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.bn = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.bn(self.b(x))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_only_provably_safe_pairs_are_folded():
    shared = Shared().eval()
    randomise_bn_statistics(shared)
    assert conv_bn_pairs(shared) == [("conv2", "bn2")]
    folded, n = fold_batchnorm(shared)
    assert n == 1 and isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), shared(x), rtol=1e-4, atol=1e-5)
    assert conv_bn_pairs(Twice().eval()) == []
    assert conv_bn_pairs(Untraceable().eval()) == []
    assert fold_batchnorm(Untraceable())[1] == 0


def test_frozen_extractor_is_folded_by_default():
    cfg = BackboneConfig(name="resnet18", weights="none", image_size=64)
    torch.manual_seed(0)
    folded = build_feature_extractor(cfg, resolve_backbone(cfg, seed=0))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.feature_dim == 512 and not any(p.requires_grad for p in folded.parameters())


def test_autocast_extraction_is_close_to_float32_and_returns_float32():
    from pipeline.frozen import frozen_features

    model = extractor("resnet18")
    randomise_bn_statistics(model)
    x = torch.randn(4, 3, 64, 64)
    [full] = list(frozen_features(model, [x], torch.device("cpu")))
    [half] = list(frozen_features(model, [x], torch.device("cpu"), "bfloat16"))
    assert full.dtype == half.dtype == "float32" and half.shape == full.shape
    assert (half != full).any()  # the forward really ran in bfloat16
    assert abs(half - full).max() <= 0.05 * abs(full).max()


def test_a_long_float32_extraction_on_a_cpu_with_amx_suggests_bfloat16(monkeypatch):
    from pipeline import frozen

    monkeypatch.setattr(frozen, "cpu_computes_bfloat16", lambda: True)
    cpu, n = torch.device("cpu"), frozen.HINT_IMAGES
    hint = frozen.bfloat16_hint(cpu, "none", n)
    assert hint.startswith("\nextract: this CPU computes bfloat16 natively (AMX): --set extract.autocast=bfloat16")
    assert frozen.bfloat16_hint(cpu, "none", n - 1) == ""                 # a short extraction: no line
    assert frozen.bfloat16_hint(cpu, "bfloat16", n) == ""                 # already asked for
    assert frozen.bfloat16_hint(torch.device("cuda"), "none", n) == ""    # not a CPU
    monkeypatch.setattr(frozen, "cpu_computes_bfloat16", lambda: False)
    assert frozen.bfloat16_hint(cpu, "none", n) == ""
    monkeypatch.undo()
    assert isinstance(frozen.cpu_computes_bfloat16(), bool)               # torch's probe, whatever this CPU is
