"""torchvision's downloaded weights (DEFAULT, a named enum) built without the random init they replace.

No download here: a checkpoint is written where torch.hub keeps it, in a temporary TORCH_HOME, under
the file name of the enum's URL, and the check of its SHA-256 prefix (resolve_backbone) is skipped.
"""
import re

import pytest
import torch
import torchvision

from pipeline import backbones
from pipeline.backbones import build_network, resolve_backbone
from pipeline.config import BackboneConfig
from pipeline.weight_files import assigning_loads, build_hub_loaded, hub_file


@pytest.fixture
def hub_checkpoint(tmp_path, monkeypatch):
    """write(name, state) puts state where torch.hub keeps name's DEFAULT checkpoint; returns the (cfg, spec)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(backbones, "check_hub_file", lambda enum: None)   # a made-up file has another hash

    def write(name, state):
        path = hub_file(torchvision.models.get_model_weights(name).DEFAULT)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        cfg = BackboneConfig(name=name, weights="DEFAULT")
        return cfg, resolve_backbone(cfg, seed=0)
    return write


def test_hub_weights_are_assigned_without_the_random_init(hub_checkpoint, real_inits):
    torch.manual_seed(1)
    source = torchvision.models.resnet18().state_dict()
    cfg, spec = hub_checkpoint("resnet18", source)
    real_inits.clear()                                      # the init above drew the checkpoint
    net = build_network(cfg, spec).eval()
    assert real_inits == []                                 # built on the meta device
    reference = torchvision.models.get_model("resnet18", weights=torchvision.models.ResNet18_Weights.DEFAULT)
    assert real_inits                                       # torchvision's own builder runs the init
    assert net.state_dict().keys() == source.keys()
    for k, v in net.state_dict().items():
        assert not v.is_meta and v.dtype == source[k].dtype and torch.equal(v, source[k]), k
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), reference.eval()(x))


def test_a_checkpoint_the_builder_renames_is_assigned_too(hub_checkpoint, real_inits):
    torch.manual_seed(2)
    source = torchvision.models.densenet121().state_dict()
    # densenet's checkpoints name 'denselayer1.norm1.weight' as 'denselayer1.norm.1.weight' (and predate
    # num_batches_tracked); its builder renames them before its own load, which assigns on the meta device
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in source.items()
              if not (".denselayer" in k and k.endswith("num_batches_tracked"))}
    assert legacy.keys() != source.keys()
    cfg, spec = hub_checkpoint("densenet121", legacy)
    real_inits.clear()
    net = build_network(cfg, spec).eval()
    assert real_inits == []                                 # built on the meta device, renamed keys and all
    reference = torchvision.models.get_model("densenet121", weights="DEFAULT").eval()
    assert real_inits
    for k, v in net.state_dict().items():                   # num_batches_tracked: what BatchNorm gives an old file
        assert not v.is_meta and torch.equal(v, reference.state_dict()[k]), k
        assert k not in legacy or torch.equal(v, source[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), reference(x))


def test_build_hub_loaded_assigns_through_the_builders_own_load_or_builds_for_real(tmp_path):
    path = tmp_path / "w.pth"
    state = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    torch.save(state, path)
    built = []

    def builder(load=True, compute=False, tie=False, fail=False):
        def build():
            net = torch.nn.Linear(2, 2)
            built.append(net.weight.device.type)
            if compute:
                net.weight.detach().sum().item()                    # no data on the meta device
            if tie:
                net.other = net.weight
            if fail:
                raise RuntimeError("checkpoint does not fit")
            if load:
                net.load_state_dict(torch.load(path, weights_only=True), strict=not tie)  # the builder's own
            return net
        return build

    for kwargs, tries in (({}, ["meta"]), ({"load": False}, ["meta", "cpu"]), ({"compute": True}, ["meta", "cpu"]),
                          ({"tie": True}, ["meta", "cpu"])):
        built.clear()
        net = build_hub_loaded(builder(**kwargs), path)
        assert built == tries and not net.weight.is_meta, kwargs
        assert kwargs.get("load") is False or torch.equal(net.weight, torch.ones(2, 2))
    built.clear()
    with pytest.raises(RuntimeError, match="does not fit"):     # the real build's own error reaches the caller
        build_hub_loaded(builder(fail=True), path)
    assert built == ["meta", "cpu"]
    built.clear()
    build_hub_loaded(builder(), tmp_path / "missing.pth")      # not downloaded yet: torchvision's own path
    assert built == ["cpu"]

    def finish(net):                                            # fills what no checkpoint holds
        net.register_buffer("extra", torch.arange(3), persistent=False)

    def with_buffer():
        net = builder()()
        net.register_buffer("extra", torch.zeros(3), persistent=False)
        return net
    built.clear()
    net = build_hub_loaded(with_buffer, path, finish)
    assert built == ["meta"] and torch.equal(net.extra, torch.arange(3))


def test_assigning_loads_changes_only_loads_into_meta_networks():
    real = torch.nn.Linear(2, 2)
    weight = real.weight
    with assigning_loads():
        real.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
        with torch.device("meta"):
            meta = torch.nn.Linear(2, 2)
        meta.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)})
    assert real.weight is weight and torch.equal(weight, torch.ones(2, 2))      # copied in, as always
    assert not meta.weight.is_meta and torch.equal(meta.weight, torch.ones(2, 2))
    original = torch.nn.Module.load_state_dict
    with pytest.raises(ValueError):
        with assigning_loads():
            raise ValueError
    assert torch.nn.Module.load_state_dict is original and "assign" in original.__code__.co_varnames


def test_fills_are_skipped_on_the_meta_device_only():
    from pipeline.weight_files import _MetaFillsSkipped

    real = torch.zeros(3)
    with torch.device("meta"), _MetaFillsSkipped():
        meta = torch.empty(3)
        assert meta.normal_() is meta and meta.clamp_(-1, 1) is meta      # returned at once
        real.normal_()
        made = torch.ones(2)                                            # factories still follow the device
    assert meta.is_meta and made.is_meta and not torch.equal(real, torch.zeros(3))
