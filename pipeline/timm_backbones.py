"""timm models as backbones: ``backbone.name = "timm/<model name>"``.

Imported only when a timm name is asked for, so the other backbones never import timm.
- build: ``timm.create_model(name, pretrained=...)``; features are timm's pooled pre-logits
  (``forward_head(forward_features(x), pre_logits=True)``); finetuning swaps the classifier with
  timm's own ``reset_classifier``.
- preprocessing: the model's pretrained config through ``timm.data.resolve_data_config``
  (input size, crop_pct, mean/std, interpolation), mapped onto the project's Preprocess so the
  cache key, finetuning and predict use the same resize / centre-crop as timm's eval transform.
- weights: DEFAULT (timm's own download through the Hugging Face Hub cache, or its URL), a local
  ``.pth`` / ``.bin`` / ``.safetensors`` state dict (its SHA-256 is in the cache key), or none. DEFAULT
  builds with timm's own loader on the meta device, its load assigning the checkpoint
  (weight_files.build_hub_loaded; fill_computed_buffers adds what no checkpoint holds).
"""
from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from pipeline.backbones import LITE0, BackboneError, load_into
from pipeline.weight_files import build_hub_loaded, file_sha256, is_local_file
from pipeline.data import Preprocess

PREFIX = "timm/"
# timm's own fallback when a model has no pretrained config.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Files timm looks for in a Hub repository, in its own order.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class TimmError(BackboneError):
    pass


def _timm():
    try:
        import timm
    except ImportError:
        raise TimmError("timm backbones need the package 'timm' (pip install timm)") from None
    return timm


def model_name(name: str) -> str:
    """'timm/convnext_tiny.fb_in22k' -> 'convnext_tiny.fb_in22k'."""
    return name[len(PREFIX):]


def check_name(name: str, key: str = "backbone.name") -> None:
    """Raise naming `key` unless timm knows the architecture and, when one is given, the weights tag."""
    timm = _timm()
    model = model_name(name)
    arch, _, tag = model.partition(".")
    if not arch or not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(PREFIX + c for c in close)}" if close else ""
        raise TimmError(f"{key} '{name}' is not a timm model (list them with "
                        f"python -c \"import timm; print(timm.list_models('*{arch[:6]}*'))\"){hint}")
    try:
        known_tag = pretrained_cfg(model) is not None
    except RuntimeError:  # "Invalid pretrained tag"
        known_tag = False
    if tag and not known_tag:
        tags = timm.list_pretrained(f"{arch}.*")
        raise TimmError(f"{key} '{name}': timm has no weights tagged '{tag}' for {arch}; choose one of "
                        f"{', '.join(PREFIX + t for t in tags) or 'none (this model has no pretrained weights)'}")


def pretrained_cfg(model: str) -> Optional[Any]:
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(model)


def _version() -> str:
    return ".".join(_timm().__version__.split(".")[:2])


def preprocess(model: str) -> Preprocess:
    """The eval preprocessing of the model's pretrained config: resize to crop / crop_pct, centre crop."""
    from timm.data import resolve_data_config

    pcfg = pretrained_cfg(model)
    data_cfg = resolve_data_config(pretrained_cfg=pcfg.to_dict() if pcfg is not None else {})
    crop = int(data_cfg["input_size"][-1])
    resize = int(math.floor(crop / data_cfg.get("crop_pct", 0.875)))  # timm's scale_size
    interpolation = data_cfg.get("interpolation", "bilinear")
    if interpolation not in ("nearest", "bilinear", "bicubic"):  # 'random' is a train-time setting
        interpolation = "bilinear"
    return Preprocess(resize, crop, tuple(float(v) for v in data_cfg.get("mean", IMAGENET_MEAN)),
                      tuple(float(v) for v in data_cfg.get("std", IMAGENET_STD)), interpolation)


def _source(model: str) -> Optional[str]:
    """Where timm downloads the DEFAULT weights from: a Hub repository id or a URL; None if nowhere."""
    pcfg = pretrained_cfg(model)
    if pcfg is None:
        return None
    if pcfg.hf_hub_id:
        return f"hf-hub:{pcfg.hf_hub_id}"
    return pcfg.url or None


def resolve(name: str, weights: str, seed: int) -> tuple[str, Preprocess]:
    """(weights identity for the cache key, preprocessing) without building or downloading anything."""
    model = model_name(name)
    pre = preprocess(model)
    timm_id = f"timm={_version()}"
    if weights == "none":
        return f"none(seed={seed});{timm_id}", pre
    if is_local_file(weights):
        if not Path(weights).is_file():
            raise TimmError(f"backbone.weights '{weights}' is not a file (give a .safetensors, .pth or .bin "
                            "state dict, DEFAULT, or none)")
        return f"file:sha256={file_sha256(weights)};{timm_id}", pre
    if weights != "DEFAULT":
        raise TimmError(f"backbone.weights '{weights}' is not available for {name}: use DEFAULT (timm's "
                        "pretrained weights), a local .safetensors / .pth / .bin file, or none; pick other "
                        f"weights through the name's tag, e.g. {PREFIX}{model.partition('.')[0]}.<tag>")
    source = _source(model)
    if source is None:
        raise TimmError(f"{name} has no pretrained weights in timm; set backbone.weights to a local "
                        ".safetensors / .pth file or none")
    return f"{source};{timm_id}", pre


# ----------------------------------------------------------------------------- weights on disk
def _hub_cached(repo_id: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    for filename in HUB_FILES:
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return found
    return None


def download_error(name: str, source: str, err: BaseException) -> TimmError:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE as hub_cache
    except ImportError:
        hub_cache = "the Hugging Face cache"
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return TimmError(
        f"could not download the weights of {name} ({source}): {reason}\nFixes:\n"
        f"  1. run once on a machine with network access and copy its Hugging Face cache ({hub_cache}) here, "
        f"or set HF_HOME to a copy of it\n"
        f"  2. or set backbone.weights to a local state-dict file: "
        f"--set backbone.weights=/path/to/model.safetensors (.pth and .bin work too)\n"
        f"  3. or use an offline backbone: --set backbone.name={LITE0} (or efficientnet_lite1, efficientnet_lite2)")


def ensure_weights(name: str, weights: str) -> None:
    """Download the DEFAULT weights now unless they are in the local cache (fail before any scanning)."""
    if weights != "DEFAULT":
        return
    model = model_name(name)
    source = _source(model)
    if source is None:
        return  # resolve() has already said so
    try:
        if source.startswith("hf-hub:"):
            repo_id = source[len("hf-hub:"):]
            if _hub_cached(repo_id):
                return
            import huggingface_hub
            from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

            try:
                huggingface_hub.hf_hub_download(repo_id, HUB_FILES[0])
            except EntryNotFoundError as first:
                if isinstance(first, LocalEntryNotFoundError):
                    raise  # offline: the second file would fail the same way, after as many retries
                huggingface_hub.hf_hub_download(repo_id, HUB_FILES[1])
        else:
            from timm.models._hub import download_cached_file

            download_cached_file(source)
    except (OSError, RuntimeError, ValueError) as e:  # hub errors are OSErrors; URL errors too
        raise download_error(name, source, e) from None
    except Exception as e:  # noqa: BLE001  httpx / hub errors outside OSError
        if type(e).__module__.split(".")[0] in ("httpx", "httpx2", "huggingface_hub", "requests", "urllib3"):
            raise download_error(name, source, e) from None
        raise


# ----------------------------------------------------------------------------- building
def _size_kwargs(model: str, image_size: int) -> dict:
    """img_size for models built for one input size (ViTs: position embeddings), when another is asked for."""
    pcfg = pretrained_cfg(model)
    if pcfg is not None and pcfg.fixed_input_size and tuple(pcfg.input_size[-2:]) != (image_size, image_size):
        return {"img_size": image_size}  # timm resamples pretrained position embeddings to it
    return {}


def build(name: str, weights: str, image_size: int) -> nn.Module:
    """The timm network with its own classifier; random initialisation draws from torch's global generator."""
    timm = _timm()
    model = model_name(name)
    kwargs = _size_kwargs(model, image_size)
    if weights == "DEFAULT":
        ensure_weights(name, weights)
        source = _source(model) or model
        cached = _hub_cached(source[len("hf-hub:"):]) if source.startswith("hf-hub:") else None
        try:
            return build_hub_loaded(lambda: timm.create_model(model, pretrained=True, **kwargs),
                                    Path(cached) if cached else None, fill_computed_buffers)
        except OSError as e:  # the cached file went missing, or the Hub had another file than ensure_weights
            raise download_error(name, source, e) from None
    if weights == "none":
        return timm.create_model(model, pretrained=False, **kwargs)
    return load_into(lambda: timm.create_model(model, pretrained=False, **kwargs), name, weights)


def _sentinel(dtype: torch.dtype):
    return float("nan") if dtype.is_floating_point else torch.iinfo(dtype).max


def _holds_sentinel(t: Optional[torch.Tensor], dtype: torch.dtype) -> bool:
    if t is None or t.is_meta:
        return True
    return bool(t.isnan().any() if dtype.is_floating_point else (t == _sentinel(dtype)).any())


def fill_computed_buffers(net: nn.Module) -> None:
    """Compute, on the CPU, the buffers that no checkpoint holds (timm's non-persistent buffers: relative
    position indices, RoPE tables, attention masks, zero k-biases) of a network built on the meta device,
    through each module's own init_non_persistent_buffers. Each is first filled with a sentinel (NaN, or
    the dtype's largest integer): one left holding any, or a bool or complex buffer, goes back to the
    meta device, so that build_hub_loaded builds the network for real instead."""
    for module in net.modules():
        metas = {n: b for n, b in module._buffers.items() if b is not None and b.is_meta}
        if not metas or not hasattr(module, "init_non_persistent_buffers"):
            continue
        if any(b.dtype == torch.bool or b.is_complex() for b in metas.values()):
            continue
        for n, b in metas.items():
            module._buffers[n] = torch.full(b.shape, _sentinel(b.dtype), dtype=b.dtype)
        try:
            module.init_non_persistent_buffers()
            filled = not any(_holds_sentinel(module._buffers.get(n), b.dtype) for n, b in metas.items())
        except Exception:  # noqa: BLE001  it computes from something still on the meta device
            filled = False
        if not filled:
            module._buffers.update(metas)


def classifier_path(net: nn.Module) -> str:
    """Dotted path of timm's classifier module (get_classifier()), e.g. 'fc' or 'head.fc'."""
    classifier = net.get_classifier()
    for path, module in net.named_modules():
        if module is classifier and path:
            return path
    raise TimmError(f"cannot find the classifier layer of {type(net).__name__} (get_classifier() is not a submodule)")


def replace_classifier(net: nn.Module, num_classes: int) -> nn.Module:
    net.reset_classifier(num_classes)
    return net


def feature_dim(net: nn.Module) -> int:
    """Width of forward_head(..., pre_logits=True): the classifier's input."""
    return int(getattr(net, "head_hidden_size", None) or net.num_features)


class TimmFeatureExtractor(nn.Module):
    """A timm network without its classifier: pooled pre-logits (N, D), as timm's forward_head gives them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.feature_dim = feature_dim(net)
        net.reset_classifier(0)  # frees the ImageNet classifier; forward_head below never uses it
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, D)
        return torch.flatten(self.net.forward_head(self.net.forward_features(x), pre_logits=True), 1)
