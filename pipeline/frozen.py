"""The frozen-extractor loop shared by extract, the view bank and the benchmark's timing."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn


def build_frozen(backbone, spec, seed: int, device: torch.device) -> nn.Module:
    """The frozen feature extractor (eval, no grad) on device, channels_last; a random init drawn from seed.

    backbone: config.BackboneConfig; spec: backbones.BackboneSpec.
    channels_last lets oneDNN / cuDNN pick faster convolution kernels (1.7x measured on CPU).
    """
    from pipeline.backbones import build_feature_extractor

    return build_feature_extractor(backbone, spec, seed=seed).to(device, memory_format=torch.channels_last)


AUTOCAST_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
HINT_IMAGES = 1000          # extractions of at least this many images on such a CPU get bfloat16_hint's line


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where oneDNN runs bfloat16 natively."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)    # torch's own check (private)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def bfloat16_hint(device: torch.device, autocast: str, images: int) -> str:
    """A line (with its leading newline) suggesting extract.autocast=bfloat16 for a float32 extraction of
    HINT_IMAGES or more images on a CPU that computes bfloat16 natively; '' otherwise."""
    if device.type != "cpu" or autocast != "none" or images < HINT_IMAGES or not cpu_computes_bfloat16():
        return ""
    return ("\nextract: this CPU computes bfloat16 natively (AMX): --set extract.autocast=bfloat16 may extract "
            "1.5-1.7x as fast (features a few % from float32's, in a cache of their own; docs/benchmarks.md)")


@torch.inference_mode()
def frozen_features(extractor: nn.Module, batches: Iterable[torch.Tensor], device: torch.device,
                    autocast: str = "none") -> Iterator[np.ndarray]:
    """For each (B, 3, H, W) batch of images: its (B, feature_dim) float32 features, on the CPU
    ({tap: (B, D_tap)} for an extractor with taps, pipeline.taps).

    Images are copied without blocking (pinned memory on CUDA) and in channels_last layout. autocast
    (extract.autocast): none, or float16 / bfloat16 forward passes under torch.autocast on device's
    type; the features come back as float32 either way and the cache key records the precision.
    """
    for images in batches:
        x = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(autocast), enabled=autocast != "none"):
            features = extractor(x)
        if isinstance(features, dict):  # a taps.TappedExtractor: {tap: (B, D_tap)} from the same pass
            yield {tap: f.float().cpu().numpy() for tap, f in features.items()}
        else:
            yield features.float().cpu().numpy()
