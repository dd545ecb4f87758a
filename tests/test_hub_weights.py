"""torchvision's downloaded weights (DEFAULT, a named enum) built without the random init they replace.

No download here: a checkpoint is written where torch.hub keeps it, in a temporary TORCH_HOME, under
the file name of the enum's URL, and the check of its SHA-256 prefix (resolve_backbone) is skipped.
"""
import re

import pytest
import torch
import torchvision

from pipeline import backbones
from pipeline.backbones import BackboneError, build_network, resolve_backbone
from pipeline.config import BackboneConfig
from pipeline.weight_files import build_hub_loaded, hub_file


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


def test_a_checkpoint_the_builder_renames_is_built_for_real(hub_checkpoint, real_inits):
    torch.manual_seed(2)
    source = torchvision.models.densenet121().state_dict()
    # densenet's checkpoints name 'denselayer1.norm1.weight' as 'denselayer1.norm.1.weight' (and predate
    # num_batches_tracked); its builder renames them
    legacy = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in source.items()
              if not (".denselayer" in k and k.endswith("num_batches_tracked"))}
    assert legacy.keys() != source.keys()
    cfg, spec = hub_checkpoint("densenet121", legacy)
    real_inits.clear()
    net = build_network(cfg, spec)
    assert real_inits                                       # the assigned load refused its names: built for real
    for k, v in net.state_dict().items():
        assert torch.equal(v, source[k]), k


def test_build_hub_loaded_falls_back_to_the_real_build(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({}, path)
    built = []

    def build():
        net = torch.nn.Linear(2, 2)
        built.append(net.weight.device.type)
        return net

    def refuse(net):
        raise BackboneError("does not fit")

    def leave_unset(net):
        pass

    def assign(net):
        net.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, assign=True)

    for fn, tries in ((refuse, ["meta", "cpu"]), (leave_unset, ["meta", "cpu"]), (assign, ["meta"])):
        built.clear()
        net = build_hub_loaded(build, path, fn)
        assert built == tries and not net.weight.is_meta
    assert torch.equal(net.weight, torch.ones(2, 2))
    built.clear()
    build_hub_loaded(build, tmp_path / "missing.pth", assign)      # not downloaded: torchvision's own path
    assert built == ["cpu"]
