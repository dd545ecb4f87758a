"""Feature taps: several feature sets of one backbone from ONE forward pass per batch (backbone.taps).

Names (docs/backbones.md has the table per family):
    pool        the final pooled pre-logits, the cache's `features` (always stored)
    stage-N     the global-average-pooled output of the N-th stage counted from the end (stage-1: the
                last); a stage is a run of the network's trunk at one spatial resolution (torchvision
                CNNs, EfficientNet-Lite's blocks), timm's `feature_info` entries (for a ViT: its blocks,
                whose tokens are averaged over the patches)
    concat      pool and every stage tap asked for, concatenated in the order of backbone.taps
    cls         ViTs (timm): the class token after the final norm
    patch_mean  ViTs (timm): the mean of the patch tokens after the final norm

The taps are forward hooks on the extractor's own modules, registered after batch-norm folding, so
`pool` is computed exactly as without taps and every other tap comes out of the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from pipeline.config_fields import STAGE_TAP as STAGE, stage_taps
from pipeline.weight_files import BackboneError

POOL = "pool"
DEFAULT_TAPS = (POOL,)
TOKEN_TAPS = ("cls", "patch_mean")
SKIPPED = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Linear)


def normalize_taps(taps: Sequence[str]) -> tuple[str, ...]:
    """pool first (always stored), then the others in the order given, each once."""
    return tuple(dict.fromkeys((POOL, *taps)))


# ----------------------------------------------------------------------------- where the stages are
def _trunk(net: nn.Module) -> list[nn.Module]:
    """The modules a torchvision or Lite network runs in sequence, whose outputs may be stage outputs."""
    if hasattr(net, "_blocks"):  # efficientnet_lite_pytorch: the MBConv blocks
        return list(net._blocks)
    for name in ("features", "trunk_output", "layers"):
        trunk = getattr(net, name, None)
        if isinstance(trunk, nn.Sequential):
            return list(trunk)
    return [m for m in net.children() if not isinstance(m, SKIPPED)]


@torch.inference_mode()
def _stages_by_resolution(extractor: nn.Module, candidates: list[nn.Module], crop: int) -> list[nn.Module]:
    """The last module of each run of candidates at one spatial size (one probe pass of a blank image)."""
    seen: list[tuple[int, tuple[int, ...]]] = []   # (candidate index, its output's (H, W)), in the order they ran

    def recorder(i: int):
        def record(_module, _inputs, output) -> None:
            if isinstance(output, torch.Tensor) and output.ndim == 4:
                seen.append((i, tuple(output.shape[2:])))
        return record

    hooks = [m.register_forward_hook(recorder(i)) for i, m in enumerate(candidates)]
    try:
        param = next(extractor.parameters())
        extractor(torch.zeros(1, 3, crop, crop, device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    stages = []
    for (i, size), nxt in zip(seen, seen[1:] + [(None, None)]):
        if nxt[1] != size:
            stages.append(candidates[i])
    return stages


def _timm_stages(net: nn.Module) -> list[nn.Module]:
    info = getattr(net, "feature_info", None) or []
    names = [d["module"] for d in info if isinstance(d, dict) and d.get("module")]
    return [net.get_submodule(n) for n in names]


@dataclass
class TapPoints:
    """Where a backbone's taps are: its stages (first to last) and, for a ViT, its final token norm."""

    stages: list[nn.Module]
    tokens: Optional[nn.Module] = None      # (B, N, D) after the final norm: cls and patch_mean
    prefix: int = 0                         # class (and register) tokens before the patch tokens
    has_cls: bool = False
    nhwc: bool = False                      # stage outputs are (B, H, W, C) (Swin)

    def names(self) -> list[str]:
        stages = [f"stage-{k}" for k in range(1, len(self.stages) + 1)] + (["concat"] if self.stages else [])
        tokens = ((["cls"] if self.has_cls else []) + ["patch_mean"]) if self.tokens is not None else []
        return [POOL, *stages, *tokens]


def find_taps(extractor: nn.Module, crop: int) -> TapPoints:
    """The stages and token norm of extractor's network (a probe pass for torchvision CNNs and the Lites)."""
    from pipeline.backbones import ConvFeatureExtractor  # backbones imports this module
    from pipeline.timm_backbones import TimmFeatureExtractor  # timm itself is not imported

    net = getattr(extractor, "net", extractor)
    if isinstance(extractor, TimmFeatureExtractor):
        vit = hasattr(net, "num_prefix_tokens") and isinstance(getattr(net, "norm", None), nn.Module)
        return TapPoints(_timm_stages(net), net.norm if vit else None, int(getattr(net, "num_prefix_tokens", 0)),
                         getattr(net, "cls_token", None) is not None, getattr(net, "output_fmt", "NCHW") == "NHWC")
    if isinstance(extractor, ConvFeatureExtractor):
        net = extractor.features
    encoder = getattr(net, "encoder", None)
    if hasattr(net, "class_token") and hasattr(encoder, "layers"):  # torchvision ViT: blocks, then encoder.ln
        return TapPoints(list(encoder.layers), encoder.ln, 1, True)
    nhwc = type(net).__name__ == "SwinTransformer"  # torchvision Swin: features are (B, H, W, C)
    return TapPoints(_stages_by_resolution(extractor, _trunk(net), crop), nhwc=nhwc)


def _pooled(x: torch.Tensor, prefix: int, nhwc: bool = False) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) global average ((B, H, W, C) when nhwc); (B, N, D) tokens -> (B, D) mean of the
    patch tokens."""
    if x.ndim == 4:
        return x.float().mean(dim=(1, 2) if nhwc else (2, 3))
    return x[:, prefix:].float().mean(dim=1)


class TappedExtractor(nn.Module):
    """extractor's forward, returning {tap: (B, D_tap)} for every tap from one pass (select: one tap's tensor)."""

    def __init__(self, extractor: nn.Module, taps: Sequence[str], crop: int, backbone: str,
                 select: Optional[str] = None) -> None:
        super().__init__()
        self.extractor, self.taps, self.select = extractor, normalize_taps(taps), select
        points = find_taps(extractor, crop)
        self.prefix, self.nhwc = points.prefix, points.nhwc
        valid = points.names()
        unknown = [t for t in self.taps if t not in valid]
        if unknown:
            raise BackboneError(f"backbone.taps {unknown} not available for {backbone}; its taps: {', '.join(valid)}")
        self.feature_dim = extractor.feature_dim
        self._seen: dict[str, torch.Tensor] = {}
        wanted = {t: points.stages[-int(STAGE.match(t).group(1))] for t in stage_taps(self.taps)}
        self._hooks = [m.register_forward_hook(self._keeper(name)) for name, m in wanted.items()]
        if set(self.taps) & set(TOKEN_TAPS):
            self._hooks.append(points.tokens.register_forward_hook(self._tokens))
        self.train(extractor.training)  # frozen: eval, as the extractor it wraps

    def _keeper(self, name: str):
        def keep(_module, _inputs, output) -> None:  # pooled at once: a later in-place op cannot change it
            self._seen[name] = _pooled(output, self.prefix, self.nhwc)
        return keep

    def _tokens(self, _module, _inputs, tokens: torch.Tensor) -> None:  # (B, N, D) after the final norm
        self._seen["cls"] = tokens[:, 0].clone()
        self._seen["patch_mean"] = tokens[:, self.prefix:].mean(dim=1)

    def forward(self, x: torch.Tensor):  # (B, 3, H, W) -> {tap: (B, D_tap)}
        self._seen.clear()
        out = {POOL: self.extractor(x), **self._seen}
        self._seen.clear()
        if "concat" in self.taps:
            parts = [POOL] + stage_taps(self.taps)
            out["concat"] = torch.cat([out[t].float() for t in parts], dim=1)
        return out[self.select] if self.select else {t: out[t] for t in self.taps}


def tapped(extractor: nn.Module, taps: Sequence[str], crop: int, backbone: str,
           select: Optional[str] = None) -> nn.Module:
    """extractor itself for the default taps (pool only, unchanged), else a TappedExtractor around it."""
    if select == POOL or select is None and normalize_taps(taps) == DEFAULT_TAPS:
        return extractor
    return TappedExtractor(extractor, taps, crop, backbone, select)


def batch_rows(batch) -> int:
    """Rows of one computed batch: an array, or {tap: array} from a TappedExtractor."""
    return len(batch[POOL] if isinstance(batch, dict) else batch)


def join_batches(batches: list):
    """The batches of one chunk as one array (or one array per tap)."""
    if batches and isinstance(batches[0], dict):
        return {tap: np.concatenate([b[tap] for b in batches]) for tap in batches[0]}
    return np.concatenate(batches)
