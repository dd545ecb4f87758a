"""End to end on real data with the real EfficientNet-Lite0 ImageNet weights."""
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import run_pipeline
from pipeline.metrics import read_metrics


@pytest.fixture(scope="module")
def digits_subset(tmp_path_factory):
    """400 train and 150 val scans, stratified, as an ImageFolder of 8x8 PNGs."""
    root = tmp_path_factory.mktemp("digits")
    digits = load_digits()
    pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train, val = train_test_split(np.arange(len(pixels)), train_size=400, test_size=150,
                                  stratify=digits.target, random_state=0)
    for split, ids in (("train", train), ("val", val)):
        for i in ids:
            folder = root / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(folder / f"{i}.png")
    return root


def test_real_weights_extract_then_train_heads(digits_subset, tmp_path, capsys):
    args = ["--params", "params.json", "extract", "head", "logistic",
            "--set", f"data.root={digits_subset}", "--set", f"extract.cache_dir={tmp_path / 'cache'}",
            "--set", f"run.output_dir={tmp_path / 'runs'}", "--set", "data.num_workers=0",
            "--set", "logistic.c_grid=[0.01, 0.1, 1.0]"]
    assert run_pipeline.main(args) == 0
    metrics = read_metrics(tmp_path / "runs" / "demo")
    assert metrics["extract"]["images"] == 550 and metrics["extract"]["cache_hit"] is False
    assert metrics["logistic"]["val_acc"] >= 0.85
    assert metrics["head"]["val_acc"] >= 0.85
    capsys.readouterr()
    assert run_pipeline.main(args[:3] + args[5:]) == 0  # extract only, again: a hit
    assert "cache hit" in capsys.readouterr().out
