"""Weights on disk: local state-dict files and torchvision's downloaded checkpoints.

- local files (``backbone.weights=/path/to/file``): ``.pth`` / ``.pt`` / ``.bin`` through
  ``torch.load(weights_only=True)``, ``.safetensors`` through safetensors (imported only when such a
  file is loaded); their SHA-256 is what the cache key records;
- torchvision's weights enums: the member that ``backbone.weights`` names, the check that a cached
  checkpoint still matches the hash prefix in its name, and the download done before any work;
- ``build_loaded``: a network built on the meta device and its weights assigned, so that the random
  initialisation the weights replace is never run (building VGG16 from a file: 1.60 -> 0.42 s, docs/backbones.md);
  ``build_hub_loaded`` does the same for torchvision's and timm's builders with downloaded weights, their
  own load made to assign (``assigning_loads``).

``BackboneError`` is defined here, the lowest module of the backbone family, so that
``backbones``, ``lite`` and ``timm_backbones`` raise the same error (``backbones`` re-exports it).
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import nn

from pipeline import PipelineError
from pipeline.fsutil import file_sha256

if TYPE_CHECKING:
    from torchvision.models import WeightsEnum

WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class BackboneError(PipelineError):
    pass


# ----------------------------------------------------------------------------- local files
def is_local_file(weights: str) -> bool:
    return weights.endswith(WEIGHT_FILE_SUFFIXES) or os.sep in weights or Path(weights).is_file()


def load_state_file(path: str) -> dict:
    """The state dict in a local file (a checkpoint's 'state_dict' or 'model' entry is unwrapped)."""
    if path.endswith(".safetensors"):
        return _load_safetensors(path)
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


def _load_safetensors(path: str) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise BackboneError(f"backbone.weights '{path}' is a .safetensors file: pip install safetensors") from None
    try:
        # safetensors maps the file; cloned, the tensors own their memory, so a network they are assigned
        # to (build_loaded) never reads a file that is rewritten in place later
        return {k: v.clone() for k, v in load_file(path, device="cpu").items()}
    except Exception as e:  # SafetensorError and friends: a damaged or foreign file
        raise BackboneError(f"backbone.weights '{path}' is not a loadable .safetensors state dict: {e}") from None


# ----------------------------------------------------------------------------- building without the random init
def has_meta_tensors(net: nn.Module) -> bool:
    """Whether any parameter, buffer or tensor attribute (or list of tensors) of net is still on the meta device."""
    def meta(value) -> bool:
        if isinstance(value, (list, tuple)):
            return any(meta(v) for v in value)
        return isinstance(value, torch.Tensor) and value.is_meta
    return (any(t.is_meta for t in net.parameters()) or any(t.is_meta for t in net.buffers())
            or any(meta(v) for m in net.modules() for v in vars(m).values()))


def shares_tensors(net: nn.Module) -> bool:
    """Whether one parameter or buffer of net is registered under two names (tied weights)."""
    return (len(list(net.named_parameters(remove_duplicate=False))) != len(list(net.named_parameters()))
            or len(list(net.named_buffers(remove_duplicate=False))) != len(list(net.named_buffers())))


class _MetaFillsSkipped(torch.overrides.TorchFunctionMode):
    """In-place fills of meta tensors (a constructor's random init) return at once: on the meta device they
    hold nothing to fill, and torch's reference kernels there cost 0.5 ms (normal_) to 1.5 ms (clamp_) a call,
    which made building DenseNet-121 on the meta device slower than building it for real."""

    FILLS = frozenset(getattr(torch.Tensor, name) for name in (
        "normal_", "uniform_", "erfinv_", "clamp_", "clamp_min_", "clamp_max_", "exponential_", "log_normal_",
        "cauchy_", "geometric_", "random_", "bernoulli_", "fill_", "zero_", "mul_", "add_", "sub_", "div_"))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def _assigned_on_meta(build: Callable[[], nn.Module], assign: Callable[[nn.Module], None]) -> Optional[nn.Module]:
    """build() on the meta device (no memory, no init) with assign(net) assigning its tensors; None where
    that cannot work: the constructor computes with its tensors, the network ties one parameter or buffer
    to two names (assigning would untie them), or assign leaves something unset. What assign raises passes."""
    try:
        with warnings.catch_warnings(), torch.device("meta"), _MetaFillsSkipped():
            warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter")   # a builder's own load
            net = build()
    except Exception:  # noqa: BLE001  a constructor computing with its tensors (.item(), numpy): build for real
        return None
    if shares_tensors(net):
        return None
    assign(net)
    if has_meta_tensors(net):
        return None
    realign(net)
    return net


def realign(net: nn.Module) -> None:
    """Copy each CPU parameter or buffer of net that does not start on a 64-byte boundary (a tensor assigned
    from a safetensors file is a view at the file's offset) into memory of its own, as a network built for real
    holds them: the SIMD kernels round otherwise (ViTs' outputs differed by 6e-8 from the same weights copied)."""
    for module in net.modules():
        for name, p in module._parameters.items():
            if p is not None and p.device.type == "cpu" and p.data_ptr() % 64:
                module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None and b.device.type == "cpu" and b.data_ptr() % 64:
                module._buffers[name] = b.clone()


def build_loaded(build: Callable[[], nn.Module], load: Callable[[nn.Module, bool], None]) -> nn.Module:
    """build() with its weights put in by load(net, assign), never running the random initialisation they replace.

    The network is built on the meta device (no memory, no init) and load assigns the state dict's
    tensors to it (load_state_dict(assign=True)). Where that leaves something unset (a classifier of
    another class count that load leaves out, a buffer the state dict does not hold), the network ties
    one parameter or buffer to two names, or the constructor cannot run on the meta device, it is built
    again for real and loaded by copy, as before. A file that does not fit the network fails in load
    either way, with the same message."""
    net = _assigned_on_meta(build, lambda net: load(net, True))
    if net is not None:
        return net
    net = build()
    load(net, False)
    return net


@contextlib.contextmanager
def assigning_loads():
    """While active, nn.Module.load_state_dict into a network that still has meta tensors (and ties none)
    assigns the state dict's tensors (assign=True) instead of copying into tensors that hold nothing, with
    the factory calls inside it on the CPU (BatchNorm's num_batches_tracked for checkpoints older than it);
    every other load is unchanged. A library builder's own load (torchvision's weights enums, timm's
    pretrained=True: their key renames and checkpoint filters included) so fills a network built on the meta
    device, reading the checkpoint once. The patch is on the class, for the duration of the block."""
    original = nn.Module.load_state_dict

    def load(self, state_dict, strict=True, assign=False):
        if assign or not has_meta_tensors(self) or shares_tensors(self):
            return original(self, state_dict, strict=strict, assign=assign)
        with torch.device("cpu"):
            return original(self, in_own_dtypes(self, state_dict), strict=strict, assign=True)

    nn.Module.load_state_dict = load
    try:
        yield
    finally:
        nn.Module.load_state_dict = original


def in_own_dtypes(net: nn.Module, state_dict: dict) -> dict:
    """state_dict with each tensor cast to the dtype of net's entry of that name and made contiguous, as
    copying it into the entry would make it (assign keeps the file's dtype: a float16 checkpoint would make a
    float16 network); its _metadata (module versions, which BatchNorm reads) kept."""
    own = net.state_dict()
    cast = OrderedDict((k, v.to(own[k].dtype).contiguous() if k in own and isinstance(v, torch.Tensor) else v)
                       for k, v in state_dict.items())
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        cast._metadata = metadata
    return cast


def build_hub_loaded(build: Callable[[], nn.Module], path: Optional[Path] = None,
                     finish: Optional[Callable[[nn.Module], None]] = None) -> nn.Module:
    """A library builder that loads its own downloaded checkpoint (torchvision with a weights enum, timm with
    pretrained=True), without the random initialisation the checkpoint replaces.

    build() runs on the meta device under assigning_loads, so the builder's own strict load assigns the
    checkpoint's tensors; finish(net) then fills what no checkpoint holds (timm's computed buffers). Where
    the checkpoint is not at path yet (the builder would download it), the constructor cannot run on the
    meta device, the builder fails there, the network ties weights or something is left unset, build() runs
    for real, as before: a damaged checkpoint fails there, with the builder's own error."""
    if path is None or path.is_file():
        def on_meta() -> nn.Module:
            with assigning_loads():
                return build()
        net = _assigned_on_meta(on_meta, finish or (lambda net: None))
        if net is not None:
            return net
    return build()


# ----------------------------------------------------------------------------- torchvision checkpoints
def weights_enum(name: str, weights: str) -> Optional[WeightsEnum]:
    """The torchvision weights enum member for backbone.weights, or None for local/none."""
    if weights == "none" or is_local_file(weights):
        return None
    import torchvision

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


def hub_file(enum: WeightsEnum) -> Path:
    """Where torch.hub keeps the checkpoint of a weights enum member."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)


def check_hub_file(enum: WeightsEnum) -> None:
    """A downloaded weights file must still match the SHA-256 prefix in its name.

    torchvision names its files '<model>-<sha256 prefix>.pth' and torch checks the prefix only when
    downloading; checking the cached copy too makes the URL in the cache key stand for the bytes.
    """
    path = hub_file(enum)
    found = re.search(r"-([a-f0-9]{6,})\.", path.name)
    if found and path.is_file() and not file_sha256(path).startswith(found.group(1)):
        raise BackboneError(f"weights file '{path}' does not match the SHA-256 prefix '{found.group(1)}' in its "
                            "name (damaged or replaced); delete it so that it is downloaded again")


def download_hub_file(name: str, enum: WeightsEnum, offline_fix: str) -> None:
    """Download the checkpoint of `enum` unless torch.hub has it (what torchvision's own
    load_state_dict_from_url does, without loading the tensors)."""
    target = hub_file(enum)
    if target.is_file():
        return
    found = torch.hub.HASH_REGEX.search(target.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(enum.url, str(target), found.group(1) if found else None, progress=True)
    except (OSError, RuntimeError) as e:  # URLError, HTTPError, socket errors; RuntimeError: hash mismatch
        raise download_error(name, enum, e, offline_fix) from None


def download_error(name: str, enum: WeightsEnum, err: Exception, offline_fix: str) -> BackboneError:
    return BackboneError(
        f"could not download the weights of {name} ({type(enum).__name__}.{enum.name}) from "
        f"{enum.url}: {getattr(err, 'reason', err)}.\nFixes:\n"
        f"  1. download that file on a machine with network access and put it at {hub_file(enum)}\n"
        f"  2. or set backbone.weights to a local state-dict file: --set backbone.weights=/path/to/file.pth\n"
        f"  3. or use the offline backbone: --set backbone.name={offline_fix}")
