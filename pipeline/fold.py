"""Inference-only rewrites of a frozen extractor: batch norm folded into the convolution before it.

In eval mode a BatchNorm2d is a fixed per-channel affine map, y = (x - mean) / sqrt(var + eps) * w + b,
so when its only input is a convolution's output it can be folded into that convolution's weight and
bias (torch.nn.utils.fusion.fuse_conv_bn_weights) and replaced by an identity: one pass over the
activations fewer per pair, the same result within float rounding.

The pairs are found on a torch.fx graph of the module, traced with every Conv2d and BatchNorm2d kept as
a leaf (so subclasses such as EfficientNet-Lite's static-same-padding convolution stay whole), and a
pair is folded only when the graph proves it safe: the convolution is called once, its output feeds
only that batch norm, and the batch norm is called once, in eval mode, with running statistics. The
original module's own forward is kept (only its layers are swapped), so Python control flow in it is
unaffected; a module that cannot be traced is left unchanged.
"""
from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _after_affine(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What is left of bn's forward once its affine map is folded away; None: unknown, do not fold.

    A subclass with its own forward may do more than normalise: timm's BatchNormAct2d applies its
    `drop` and `act` after the batch norm (timm's EfficientNets, ConvNeXt stems, ...), so those stay.
    """
    if type(bn).forward is nn.BatchNorm2d.forward:
        return nn.Identity()
    if type(bn).__name__ == "BatchNormAct2d" and type(bn).__module__.startswith("timm."):
        return nn.Sequential(bn.drop, bn.act)
    return None


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv path, batch-norm path) pairs of module that can be folded; [] when it cannot be traced."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception:  # data-dependent control flow, unsupported ops: nothing is folded
        return []
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(module.get_submodule(node.target), nn.BatchNorm2d):
            continue
        bn = module.get_submodule(node.target)
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        conv = module.get_submodule(source.target)
        if (isinstance(conv, nn.Conv2d) and len(source.users) == 1 and calls[source.target] == 1
                and calls[node.target] == 1 and bn.track_running_stats and bn.running_mean is not None
                and conv.padding_mode == "zeros" and _after_affine(bn) is not None):
            pairs.append((source.target, node.target))
    return pairs


def _set(module: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


@torch.no_grad()
def fold_batchnorm(module: nn.Module, inplace: bool = False) -> tuple[nn.Module, int]:
    """module (a copy unless inplace) in eval mode with every foldable conv -> batch-norm pair folded.

    Returns (module, number of pairs folded). Only for inference: the folded module has no batch-norm
    statistics left to update, so never train it.
    """
    folded = (module if inplace else copy.deepcopy(module)).eval()
    pairs = conv_bn_pairs(folded)
    for conv_path, bn_path in pairs:
        conv, bn = folded.get_submodule(conv_path), folded.get_submodule(bn_path)
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                            bn.eps, bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        _set(folded, bn_path, _after_affine(bn))
    folded.requires_grad_(False)
    return folded, len(pairs)
