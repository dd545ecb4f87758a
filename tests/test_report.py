import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.config import ReportConfig, load_config
from pipeline.data import load_dataset
from pipeline.plots import accuracies, grid_indices, lr_drops
from pipeline.report import Predictions, classification_report_dict, report_paths, run_report, write_reports
from tests.conftest import make_image_folder, tiny_overrides

CPU = torch.device("cpu")
KINDS = ("head", "logistic", "finetune")


def test_lr_drops_are_where_steplr_decayed():
    history = [{"epoch": e, "lr": lr} for e, lr in enumerate([0.1, 0.1, 0.01, 0.01, 0.001], start=1)]
    assert lr_drops(history) == [(3, 0.01), (5, 0.001)]
    assert lr_drops(history[:2]) == []


def test_grid_shows_the_most_confident_mistakes_first():
    y_true = np.array([0, 0, 1, 1, 2, 2, 0, 1])
    y_pred = np.array([1, 0, 1, 0, 2, 0, 0, 1])        # wrong at 0, 3, 5
    conf = np.array([0.6, 0.9, 0.9, 0.95, 0.8, 0.7, 0.9, 0.9])
    idx = grid_indices(y_true, y_pred, conf, n=4)
    assert idx[:2] == [3, 5]                            # half the grid at most, most confident first
    assert len(set(idx)) == 4 and all(y_true[i] == y_pred[i] for i in idx[2:])
    assert len({y_true[i] for i in idx[2:]}) == 2       # the correct ones come from different classes
    assert {y_true[i] for i in grid_indices(y_true, y_pred, conf, n=6)[3:]} == {0, 1, 2}
    assert grid_indices(y_true, y_pred, conf, n=8)[:3] == [3, 5, 0]  # every mistake when there is room
    assert sorted(grid_indices(y_true, y_pred, conf, n=50)) == list(range(8))


def test_figures_show_top1_and_mean_per_class_side_by_side():
    # 3 of 4 right, but the rare class never: top-1 hides it, mean per-class does not
    assert accuracies(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0])) == (0.75, 0.5)
    assert accuracies(np.array([0, 1, 2]), np.array([0, 1, 2])) == (1.0, 1.0)


def predictions(tmp_path, y_true, y_pred, classes):
    probs = np.full((len(y_pred), len(classes)), 0.1)
    probs[np.arange(len(y_pred)), y_pred] = 0.9
    for i in range(len(y_true)):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    return Predictions(probs, np.asarray(y_true), [f"{i}.png" for i in range(len(y_true))], tmp_path, classes)


def test_classification_report_by_hand(tmp_path):
    # ants: 2 true, predicted [ants, bees]; bees: 3 true, predicted [bees, bees, ants]
    preds = predictions(tmp_path, [0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["ants", "bees"])
    report = classification_report_dict(preds)
    assert report["ants"]["precision"] == pytest.approx(1 / 2) and report["ants"]["recall"] == pytest.approx(1 / 2)
    assert report["bees"]["precision"] == pytest.approx(2 / 3) and report["bees"]["recall"] == pytest.approx(2 / 3)
    assert report["bees"]["f1-score"] == pytest.approx(2 / 3) and report["bees"]["support"] == 3
    assert report["val_acc_top1"] == pytest.approx(3 / 5, abs=1e-4)
    assert report["mean_per_class_acc"] == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-4)


def png_size(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        return img.size


def test_write_reports_files(tmp_path):
    preds = predictions(tmp_path, [0, 1, 2, 2], [0, 1, 2, 0], ["cat", "dog", "a rather long class name"])
    history = [{"epoch": e, "lr": 0.1 if e < 3 else 0.01, "train_loss": 1 / e, "val_loss": 1.2 / e,
                "train_acc": 0.2 * e, "val_acc": 0.15 * e} for e in range(1, 5)]
    written = write_reports(tmp_path / "run", "head", preds, ReportConfig(grid_images=3), "test", history=history)
    paths = report_paths(tmp_path / "run", "head")
    assert set(written) == {paths[k] for k in ("confusion_matrix", "classification_report",
                                               "classification_report_json", "training_curves", "predictions")}
    for key in ("confusion_matrix", "training_curves", "predictions"):
        width, height = png_size(paths[key])
        assert width >= 300 and height >= 200, key
    text = paths["classification_report"].read_text()
    assert "a rather long class name" in text and "mean per-class acc    0.8333" in text
    assert not paths["cv_scores"].exists()  # no cross-validation without cv results


def test_training_stages_write_reports(trained_run):
    run_dir = trained_run.cfg.run_dir
    for kind in KINDS:
        paths = report_paths(run_dir, kind)
        entry = trained_run.entries[kind]
        assert {str(paths[k]) for k in ("confusion_matrix", "classification_report", "predictions")} <= set(entry["reports"])
        for key in ("confusion_matrix", "predictions"):
            assert png_size(paths[key])[0] >= 300
        assert paths["training_curves"].exists() == (kind != "logistic")
        assert paths["cv_scores"].exists() == (kind == "logistic")
        report = json.loads(paths["classification_report_json"].read_text())
        assert report["mean_per_class_acc"] == entry["mean_per_class_acc"]
        assert report["val_acc_top1"] == entry["val_acc"]  # the saved (best) model is the one reported
        assert set(report) >= {"ants", "bees", "macro avg"}


def copy_run(trained_run, tmp_path):
    """A private copy of the trained run folder (the artifacts point at the shared cache and images)."""
    shutil.copytree(trained_run.cfg.run_dir, tmp_path / "runs" / "t")
    return load_config(None, trained_run.overrides + [f"run.output_dir={tmp_path / 'runs'}"])


def no_training(*args, **kwargs):
    raise AssertionError("report retrained a model")


def test_report_regenerates_from_artifacts_without_training(trained_run, tmp_path, monkeypatch):
    import pipeline.engine
    import pipeline.head
    import pipeline.logistic

    cfg = copy_run(trained_run, tmp_path)
    shutil.rmtree(cfg.run_dir / "reports")
    for module, name in ((pipeline.head, "train_head"), (pipeline.logistic, "fit_logistic"),
                         (pipeline.engine, "train_one_epoch")):
        monkeypatch.setattr(module, name, no_training)
    out = run_report(cfg, CPU)
    assert set(out) == set(KINDS)
    for kind in KINDS:
        new, old = report_paths(cfg.run_dir, kind), report_paths(trained_run.cfg.run_dir, kind)
        assert json.loads(new["classification_report_json"].read_text()) == \
            json.loads(old["classification_report_json"].read_text())
        assert new["confusion_matrix"].exists() and new["predictions"].exists()
        assert new["training_curves"].exists() == (kind != "logistic")


def test_report_runs_the_backbone_when_the_cache_is_gone(trained_run, tmp_path, monkeypatch, capsys):
    cfg = copy_run(trained_run, tmp_path)

    def gone(*args, **kwargs):
        raise fc.CacheError("no feature cache")
    monkeypatch.setattr(fc, "read_cache", gone)
    monkeypatch.setattr(fc, "open_features", gone)
    out = run_report(cfg, CPU)
    assert "running the backbone over the val images" in capsys.readouterr().out
    for kind in ("head", "logistic"):
        new, old = report_paths(cfg.run_dir, kind), report_paths(trained_run.cfg.run_dir, kind)
        assert json.loads(new["classification_report_json"].read_text()) == \
            json.loads(old["classification_report_json"].read_text())
        assert out[kind]["per_class_acc"] == trained_run.entries[kind]["per_class_acc"]


def test_report_without_models_is_a_clear_error(tiny_cfg):
    cfg = tiny_cfg()
    with pytest.raises(PipelineError, match="no trained model in .*run head, logistic or finetune first"):
        run_report(cfg, CPU)
    (cfg.run_dir / "resnet18").mkdir(parents=True)
    (cfg.run_dir / "resnet18" / "head.pt").write_bytes(b"")  # as a benchmark leaves them
    with pytest.raises(PipelineError, match="benchmark sub-folders have models: --set run.name=t/resnet18"):
        run_report(cfg, CPU)


def test_report_names_a_features_file_that_is_not_the_models_and_images_whose_classes_changed(tiny_cfg, image_root):
    from pipeline.extract import run_extract
    from pipeline.head import run_head

    run_head(tiny_cfg("head.epochs=1"), CPU)
    other = run_extract(tiny_cfg("backbone.image_size=40", "run.name=other"), CPU)["cache_file"]   # another key
    with pytest.raises(fc.CacheError, match=r"report: head: features.file does not hold the features head.pt was "
                                            r"trained on: cache '.*' does not match"):
        run_report(tiny_cfg(f"features.file={other}"), CPU)
    cfg = tiny_cfg()
    for path in Path(cfg.extract.cache_dir).glob("*.h5"):
        path.unlink()                                   # the cache is gone: report runs the backbone on the images
    make_image_folder(image_root, classes=("ants", "bees", "wasps"), n_train=1, n_val=1)    # a class added since
    with pytest.raises(PipelineError, match=r"the classes in '.*' \(ants, bees, wasps\) are not the ones head.pt "
                                            r"was trained on \(ants, bees\)"):
        run_report(cfg, CPU)


@pytest.mark.parametrize("layout", ["val_fraction", "valid", "dev"])
def test_report_redraws_a_finetune_run_on_a_val_fraction_or_val_dir_split(tmp_path, layout):
    from pipeline.finetune import run_finetune

    root = make_image_folder(tmp_path / "imgs", n_train=4 if layout == "val_fraction" else 2, n_val=1)
    if layout == "val_fraction":
        shutil.rmtree(root / "val")
        split = ["data.val_fraction=0.25"]
    else:
        (root / "val").rename(root / layout)
        split = [f"data.val_dir={layout}"]
    cfg = load_config(None, tiny_overrides(tmp_path, root) + split + ["finetune.batch_size=8"])
    entry = run_finetune(cfg, CPU)
    model = torch.load(cfg.run_dir / "finetune.pt", weights_only=False)
    assert model["data_split"]["val_dir" if layout != "val_fraction" else "val_fraction"] == \
        (layout if layout != "val_fraction" else 0.25)
    # the redraw finds the val images the model was chosen on, even when this run's params leave the split out
    out = run_report(load_config(None, tiny_overrides(tmp_path, root)), CPU)["finetune"]
    assert out["val_acc_top1"] == entry["val_acc"]
    report = json.loads(report_paths(cfg.run_dir, "finetune")["classification_report_json"].read_text())
    assert sum(report[c]["support"] for c in ("ants", "bees")) == len(load_dataset(cfg.data).val) > 0


LONG_NAMES = [f"an extraordinarily long class name number {i}" for i in range(12)]
CLASS_SETS = {"flowers": ["daisy", "dandelion", "roses", "sunflowers", "tulips"], "digits": list("0123456789"),
              "long names": LONG_NAMES}


def drawn(fig):
    """(renderer, figure box in pixels) of fig drawn by Agg, as savefig draws it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer(), fig.bbox


def inside(box, outer, slack=1.0):
    return (box.x0 >= outer.x0 - slack and box.y0 >= outer.y0 - slack and box.x1 <= outer.x1 + slack
            and box.y1 <= outer.y1 + slack)


@pytest.mark.parametrize("name", CLASS_SETS)
def test_fixed_margins_keep_the_confusion_matrix_text_inside_and_apart(name):
    from pipeline.plots import confusion_figure

    classes = CLASS_SETS[name]
    y = np.arange(60) % len(classes)
    fig = confusion_figure(y, np.roll(y, 1), classes, "efficientnet_lite0 + linear head on cached pool features: "
                                                        "confusion matrix on val")
    renderer, page = drawn(fig)
    matrix, bar = fig.axes
    heading = fig.texts[0]
    assert inside(fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans), page)  # nothing clipped
    assert heading.get_window_extent(renderer).y0 >= matrix.get_tightbbox(renderer).y1  # title above it all
    assert matrix.get_tightbbox(renderer).x1 <= bar.get_window_extent(renderer).x0      # colourbar apart
    assert bar.get_tightbbox(renderer).x1 <= page.x1                                   # its labels inside


@pytest.mark.parametrize("lr_drops", [0, 3])
def test_fixed_margins_keep_the_training_curves_text_inside_and_apart(lr_drops):
    from pipeline.plots import curves_figure

    history = [{"epoch": e, "lr": 0.1 * 0.1 ** (lr_drops * e // 30), "train_loss": 12.5 / e, "val_loss": 13.0 / e,
                "train_acc": 0.03 * e, "val_acc": 0.028 * e} for e in range(1, 31)]
    fig = curves_figure(history, "a rather long model title: " * 4 + "training curves")
    renderer, page = drawn(fig)
    loss, acc = fig.axes
    assert inside(fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans), page)
    assert loss.get_tightbbox(renderer).x1 <= acc.get_tightbbox(renderer).x0
    assert fig.texts[0].get_window_extent(renderer).y0 >= max(ax.title.get_window_extent(renderer).y1
                                                              for ax in (loss, acc))


def test_prediction_grid_is_one_picture_with_captions_that_fit_their_tiles(tmp_path):
    from PIL import ImageDraw, ImageFont

    from pipeline import plots

    images = [Image.new("RGB", size, (90, 140, 60)) for size in [(256, 165), (180, 240), (8, 8)] * 3]
    true, pred = LONG_NAMES[:9], LONG_NAMES[:8] + ["daisy"]
    path = plots.plot_prediction_grid(images, true, pred, [0.99] * 9, tmp_path / "g.png", "t " * 200,
                                      [f"class/{'x' * 60}.jpg"] * 9)
    assert png_size(path)[0] == 6 * plots.CELL[0]                  # 9 images: two rows of 6 tiles
    with Image.open(path) as img:                                  # a mistake's frame is red, a right one's not
        red = tuple(int(plots.WRONG[k:k + 2], 16) for k in (1, 3, 5))
        assert red in {c for _, c in img.getcolors(1 << 20)}
    canvas, boxes = plots._mosaic(images, [t != p for t, p in zip(true, pred)], 6, 0)
    edge = [tuple(canvas[y - 2, x + 2]) for x, y, _, _ in boxes]
    assert edge[8] == red and all(e == (255, 255, 255) for e in edge[:8])
    font = plots._font(8)
    assert isinstance(font, ImageFont.FreeTypeFont)                # matplotlib's DejaVu Sans
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(draw.textlength(f"pred {plots._short(n)} (0.99)", font=font) for n in LONG_NAMES)
    assert widest <= plots.CELL[0] and draw.textlength(plots._short("x" * 60, 32), font=plots._font(7)) <= plots.CELL[0]


def test_grid_thumbnails_of_big_jpegs_are_decoded_small_and_upright(tmp_path):
    from pipeline.plots import TILE
    from pipeline.report import _jpeg_thumbnail, _thumbnail

    exif = Image.Exif()
    exif[0x0112] = 6                                     # orientation: rotate 90 degrees to show upright
    Image.new("RGB", (2400, 1200), (200, 30, 30)).save(tmp_path / "big.jpg", exif=exif.tobytes())
    Image.new("I;16", (300, 150), 65535).save(tmp_path / "deep.png")
    big, deep = _thumbnail(tmp_path, "big.jpg"), _thumbnail(tmp_path, "deep.png")
    assert big.mode == "RGB" and big.size == (TILE // 2, TILE)  # upright: portrait, fitted to the tile
    assert _jpeg_thumbnail(tmp_path / "big.jpg", TILE).size == (300, 600)    # decoded at a quarter, upright
    assert big.getpixel((10, 10))[0] > 150                        # the photo, not the grey placeholder
    assert deep.mode == "RGB" and deep.getpixel((5, 5)) == (255, 255, 255)  # 16-bit scaled by data.load_image
    assert _thumbnail(tmp_path, "gone.jpg").getpixel((0, 0)) == (200, 200, 200)
