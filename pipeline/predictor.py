"""Rebuild a trained classifier from its run-folder artifact: images (or cached features) -> probabilities.

- head: the backbone cut as at extraction, then the saved head: an nn.Linear (head.type linear, or a
  sweep's logistic winner folded into one), the dense classifier, or an mlp / knn / ncm probe
  rebuilt from its state (pipeline.probes.load_probe);
- logistic: the same backbone, then the saved scikit-learn pipeline;
- finetune: the whole network with its trained weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.artifacts import MODEL_FILES, load_checkpoint, load_joblib
from pipeline.backbones import (BackboneSpec, build_classifier, build_feature_extractor, dense_classifier,
                                resolve_backbone)
from pipeline.config import BackboneConfig
from pipeline.data import Preprocess
from pipeline.records import ModelArtifact
from pipeline.rundir import reading
from pipeline.taps import tapped


@dataclass
class Predictor:
    kind: str                       # head | logistic | finetune
    classes: list[str]
    preprocess: Preprocess
    artifact: dict                  # the saved metadata (data_root, cache_file, seed, ...)
    classify: Callable[[torch.Tensor], np.ndarray]  # features (images for finetune) -> (N, C) probabilities
    extractor: Optional[nn.Module] = None            # images -> features; None for finetune
    device: torch.device = torch.device("cpu")

    @property
    def uses_features(self) -> bool:
        return self.kind in ("head", "logistic")

    @torch.inference_mode()
    def probs_from_images(self, images: torch.Tensor) -> np.ndarray:
        """images: (N, 3, H, W) preprocessed -> (N, num_classes) probabilities."""
        x = images.to(self.device)
        if self.uses_features:
            if self.extractor is None:
                raise RuntimeError("predictor was loaded without its backbone")
            x = self.extractor(x.contiguous(memory_format=torch.channels_last)).float()
        return self.classify(x)

    @torch.inference_mode()
    def probs_from_features(self, features: np.ndarray) -> np.ndarray:
        """features: (N, feature_dim) as cached -> (N, num_classes) probabilities."""
        if not self.uses_features:
            raise RuntimeError("a finetuned network classifies images, not cached features")
        return self.classify(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(self.device))


def model_path(run_dir: Path, kind: str) -> Path:
    return Path(run_dir) / MODEL_FILES[kind]


def _missing_model(run_dir: Path, kind: str) -> PipelineError:
    """No model file: say which stage makes it, and point at sub-folders that have one (a benchmark's)."""
    run_dir = Path(run_dir)
    found = sorted(p.parent.name for p in run_dir.glob(f"*/{MODEL_FILES[kind]}")) if run_dir.is_dir() else []
    hint = (f"; this folder's benchmark sub-folders have one: --set run.name={run_dir.name}/{found[0]}"
            if found else "")
    return PipelineError(f"no {kind} model at '{model_path(run_dir, kind)}': run the {kind} stage first, "
                         f"or set run.name to the run folder that holds it{hint}")


def load_artifact(run_dir: Path, kind: str, trust: bool = False) -> dict:
    """The saved model file of stage `kind` in run_dir, as a dict."""
    path = model_path(run_dir, kind)
    with reading(run_dir):  # the model file and its SHA256SUMS record from one publish
        if not path.is_file():
            raise _missing_model(run_dir, kind)
        obj = load_joblib(path, trust) if path.suffix == ".joblib" else load_checkpoint(path, trust)
    if not isinstance(obj, dict) or "classes" not in obj:
        raise PipelineError(f"'{path}' is not a {kind} model written by this tool")
    # a version this tool reads, with every key its readers need (a hand-made file gets one line naming them)
    ModelArtifact.from_dict(obj, f"'{path}'", kind)
    return obj


def backbone_of(artifact: dict) -> tuple[BackboneConfig, BackboneSpec]:
    """The backbone the artifact was trained with; an error if its weights are not the same any more."""
    cfg = BackboneConfig(**artifact["backbone_config"])
    spec = resolve_backbone(cfg, artifact["seed"])
    saved = artifact["backbone"]["weights_id"]
    if spec.weights_id != saved:
        raise PipelineError(f"the backbone weights changed since this model was trained ({saved} then, "
                            f"{spec.weights_id} now): retrain it, or restore backbone.weights '{cfg.weights}'")
    return cfg, spec


def _build_extractor(artifact: dict, device: torch.device) -> nn.Module:
    cfg, spec = backbone_of(artifact)
    # seeded as at extraction: a random-init backbone must be the same one
    extractor = build_feature_extractor(cfg, spec, seed=artifact["seed"]).to(device, memory_format=torch.channels_last)
    tap = artifact["backbone"].get("tap", "pool")  # the cached tap the model was trained on (head.tap)
    # concat joins the stage taps its cache lists; any other tap needs only its own hook
    taps = artifact["backbone"].get("taps", [tap]) if tap == "concat" else [tap]
    return tapped(extractor, taps, spec.preprocess.crop_size, spec.name, select=tap)


PROBE_HEADS = ("mlp", "knn", "ncm")   # saved as pipeline.probes state, not as a module's state dict


def _probe_proba(artifact: dict, device: torch.device) -> Callable[[torch.Tensor], np.ndarray]:
    """The saved mlp / knn / ncm probe: features -> (N, num_classes) probabilities."""
    from pipeline.probes import load_probe

    head_type = artifact["head_type"]
    try:
        probe = load_probe(artifact["state_dict"], device)
        fits = probe.n_features == artifact["feature_dim"] and probe.num_classes == len(artifact["classes"])
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise PipelineError(f"the saved {head_type} head cannot be rebuilt ({str(e).splitlines()[0]}): train it "
                            "again with the head stage") from None
    if not fits:
        raise PipelineError(f"the saved {head_type} head does not fit its recorded shape ({artifact['feature_dim']} "
                            f"features, {len(artifact['classes'])} classes): train it again with the head stage")
    return probe.predict_proba


def _head_classifier(artifact: dict, device: torch.device) -> Callable[[torch.Tensor], np.ndarray]:
    if artifact.get("head_type", "linear") in PROBE_HEADS:
        return _probe_proba(artifact, device)
    return _softmax(_head_module(artifact).to(device))


def _head_module(artifact: dict) -> nn.Module:
    """nn.Linear (linear, a folded logistic winner) or the dense classifier, with the saved weights."""
    num_classes = len(artifact["classes"])
    if artifact.get("head_type", "linear") == "classifier":
        name = artifact["backbone_config"]["name"]
        import torchvision

        with torch.device("meta"):  # only the architecture: the weights come from the artifact
            net = torchvision.models.get_model(name, weights=None)
        head = dense_classifier(name, net, num_classes)
    else:
        head = nn.Linear(artifact["feature_dim"], num_classes)
    try:
        head.load_state_dict(artifact["state_dict"], assign=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise PipelineError(f"the saved head does not fit its recorded shape ({str(e).splitlines()[0]}): "
                            "train it again with the head stage") from None
    return head.eval()


def _softmax(module: nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    def classify(x: torch.Tensor) -> np.ndarray:
        out = module(x)
        logits = out[0] if isinstance(out, tuple) else out
        return torch.softmax(logits.float(), 1).cpu().numpy()
    return classify


def _sklearn_proba(model, num_classes: int) -> Callable[[torch.Tensor], np.ndarray]:
    def classify(x: torch.Tensor) -> np.ndarray:
        proba = model.predict_proba(x.cpu().numpy())   # columns follow model.classes_
        out = np.zeros((len(proba), num_classes), dtype=np.float64)
        out[:, model.classes_] = proba
        return out
    return classify


def predictor_from_artifact(kind: str, artifact: dict, device: torch.device, with_backbone: bool = True,
                            network: Optional[nn.Module] = None) -> Predictor:
    """A Predictor for an artifact dict; with_backbone=False skips building the backbone (cached features).

    network: for finetune, an already-built model to use instead of rebuilding it from the artifact.
    """
    classes = list(artifact["classes"])
    preprocess = Preprocess.from_dict(artifact["backbone"]["preprocess"])
    if kind == "finetune":
        if network is None:
            cfg, spec = backbone_of(artifact)
            network = build_classifier(cfg, spec, len(classes))
            try:
                network.load_state_dict(artifact["model"])
            except (RuntimeError, TypeError, AttributeError) as e:
                raise PipelineError(f"the saved network does not fit {cfg.name} ({str(e).splitlines()[0]}): "
                                    "train it again with the finetune stage") from None
        network = network.to(device).eval()
        return Predictor(kind, classes, preprocess, artifact, _softmax(network), None, device)
    if kind == "head":
        classify = _head_classifier(artifact, device)
    elif kind == "logistic":
        classify = _sklearn_proba(artifact["model"], len(classes))
    else:
        raise PipelineError(f"unknown model '{kind}' (choose {', '.join(MODEL_FILES)})")
    extractor = _build_extractor(artifact, device) if with_backbone else None
    return Predictor(kind, classes, preprocess, artifact, classify, extractor, device)


def load_predictor(run_dir: Path, kind: str, device: torch.device, with_backbone: bool = True,
                   trust: bool = False) -> Predictor:
    """Rebuild stage `kind`'s saved model from run_dir."""
    return predictor_from_artifact(kind, load_artifact(run_dir, kind, trust), device, with_backbone)
