"""Feature taps (pipeline/taps.py, backbone.taps, head.tap, sweep.taps): shapes, key, one pass, cache, heads, predict."""
import json

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import PipelineError
from pipeline import cache as fc
from pipeline.backbones import BackboneError, build_feature_extractor, resolve_backbone
from pipeline.config import BackboneConfig, ConfigError, load_config
from pipeline.data import eval_transform
from pipeline.extract import ExtractJob, ensure_cache
from pipeline.taps import tapped

from conftest import tiny_overrides

CPU = torch.device("cpu")
TAPS = '["pool", "stage-1", "stage-2", "concat"]'


def _extractor(name, size, taps):
    cfg = BackboneConfig(name=name, weights="none", image_size=size, taps=["pool", *taps])
    spec = resolve_backbone(cfg, seed=0)
    return tapped(build_feature_extractor(cfg, spec, seed=0), spec.taps, size, name)


@torch.inference_mode()
def _shapes(name, size, taps):
    out = _extractor(name, size, taps)(torch.randn(2, 3, size, size))
    return out, {k: tuple(v.shape) for k, v in out.items()}


def test_torchvision_taps_shapes_and_values():
    out, shapes = _shapes("resnet18", 32, ["stage-1", "stage-2", "concat"])
    assert shapes == {"pool": (2, 512), "stage-1": (2, 512), "stage-2": (2, 256), "concat": (2, 512 + 512 + 256)}
    # resnet's pool is the global average of layer4, which is stage-1; concat is pool, stage-1, stage-2 in order
    assert torch.allclose(out["stage-1"], out["pool"], atol=1e-5)
    assert torch.equal(out["concat"], torch.cat([out["pool"], out["stage-1"], out["stage-2"]], dim=1))


def test_lite_taps_are_its_block_stages():
    _, shapes = _shapes("efficientnet_lite0", 64, ["stage-1", "stage-2", "stage-3"])
    assert shapes == {"pool": (2, 1280), "stage-1": (2, 320), "stage-2": (2, 112), "stage-3": (2, 40)}


def test_timm_cnn_and_vit_taps():
    pytest.importorskip("timm")
    _, shapes = _shapes("timm/test_resnet", 32, ["stage-1", "stage-2"])
    assert shapes == {"pool": (2, 96), "stage-1": (2, 96), "stage-2": (2, 192)}
    extractor = _extractor("timm/test_vit", 32, ["cls", "patch_mean", "stage-1"])
    net = extractor.extractor.net
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = extractor(x)
        tokens = net.forward_features(x)  # (B, 1 + patches, D) after the final norm
    assert {k: tuple(v.shape) for k, v in out.items()} == {t: (2, 64) for t in ("pool", "cls", "patch_mean", "stage-1")}
    assert torch.allclose(out["cls"], tokens[:, 0], atol=1e-6)
    assert torch.allclose(out["cls"], out["pool"], atol=1e-6)  # test_vit pools by its class token
    assert torch.allclose(out["patch_mean"], tokens[:, net.num_prefix_tokens:].mean(1), atol=1e-6)


def test_torchvision_vit_taps_are_its_blocks_and_tokens():
    from torchvision.models import VisionTransformer

    from pipeline.backbones import FeatureExtractor
    from pipeline.taps import TappedExtractor

    torch.manual_seed(0)
    net = VisionTransformer(image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32)
    extractor = TappedExtractor(FeatureExtractor("vit_b_16", net).eval(), ["cls", "patch_mean", "stage-3"], 32, "vit")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = extractor(x)
        tokens = net.encoder(torch.cat([net.class_token.expand(2, -1, -1), net._process_input(x)], dim=1))
        first_block = net.encoder.layers[0](net.encoder.dropout(
            torch.cat([net.class_token.expand(2, -1, -1), net._process_input(x)], dim=1) + net.encoder.pos_embedding))
    assert torch.allclose(out["cls"], out["pool"], atol=1e-6)  # torchvision's ViT classifies its class token
    assert torch.allclose(out["patch_mean"], tokens[:, 1:].mean(1), atol=1e-5)
    assert torch.allclose(out["stage-3"], first_block[:, 1:].mean(1), atol=1e-5)  # 3 blocks: stage-3 is the first


def test_unknown_taps_fail_in_one_line_naming_the_valid_ones():
    with pytest.raises(BackboneError, match=r"backbone.taps \['cls'\] not available for resnet18; its taps: pool, "
                                            r"stage-1, .*concat$"):
        _extractor("resnet18", 32, ["cls"])
    with pytest.raises(BackboneError, match=r"stage-9.*its taps: pool, stage-1"):
        _extractor("resnet18", 32, ["stage-9"])
    with pytest.raises(ConfigError, match=r"backbone.taps \['layer3'\] unknown; use pool, stage-1"):
        load_config(None, ['backbone.taps=["layer3"]'])
    with pytest.raises(ConfigError, match=r"^head.tap \['layer3'\] unknown"):
        load_config(None, ["head.tap=layer3"])
    with pytest.raises(ConfigError, match=r"^sweep.taps \['Pool'\] unknown"):
        load_config(None, ['sweep.taps=["Pool"]'])


def test_chunks_keep_every_tap_and_a_chunk_without_them_is_recomputed(tmp_path, capsys):
    rows = {"pool": np.ones((2, 4), np.float32), "stage-2": np.full((2, 3), 2, np.float32)}
    tapped_store = fc.ChunkStore(tmp_path / "p", "k", "float32", ("pool", "stage-2"))
    path = tapped_store.write(["a" * 64, "b" * 64], rows)
    found, dim = tapped_store.rows()
    assert dim == 4 and found["b" * 64] == fc.RowSource(path, "features", 1)
    with h5py.File(path) as f:
        assert np.array_equal(f["taps/stage-2"][()], rows["stage-2"])
    plain = fc.ChunkStore(tmp_path / "q", "k", "float32")
    plain.write(["c" * 64], rows["pool"][:1])
    lacking = fc.ChunkStore(tmp_path / "q", "k", "float32", ("pool", "stage-2"))
    assert lacking.rows() == ({}, None) and not lacking.chunk_files()  # discarded: its rows get recomputed
    assert "lacks the datasets of backbone.taps" in capsys.readouterr().out


def test_cache_key_covers_taps_and_default_key_is_unchanged():
    def config(taps):
        cfg = BackboneConfig(name="resnet18", weights="none", image_size=32, taps=taps)
        return fc.feature_config(resolve_backbone(cfg, seed=0), "float32")
    default, tapped_cfg = config(["pool"]), config(["pool", "stage-2"])
    assert "taps" not in default  # the key of every existing pool-only cache stays what it was
    assert tapped_cfg == {**default, "taps": ["pool", "stage-2"]}
    assert fc.digest(default) != fc.digest(tapped_cfg) != fc.digest(config(["pool", "stage-1"]))
    assert config(["stage-2"]) == tapped_cfg  # pool is always stored, listed or not


def test_one_forward_pass_per_batch_for_every_tap(tiny_cfg):
    cfg = tiny_cfg(f"backbone.taps={TAPS}", "extract.batch_size=4")
    calls = []
    original = torch.nn.Conv2d.forward

    def counting(self, x):
        if self.in_channels == 3:  # resnet18's stem conv1: once per forward pass of the network
            calls.append(len(x))
        return original(self, x)

    torch.nn.Conv2d.forward = counting
    try:
        plan, _ = ensure_cache(ExtractJob.of(cfg), CPU)
    finally:
        torch.nn.Conv2d.forward = original
    n_images = sum(len(m) for m in plan.manifests.values())
    probe = 1  # the stage search's one blank image when the extractor is built
    assert len(calls) == probe + -(-n_images // 4) and sum(calls) == probe + n_images


def _datasets(path):
    names = []
    with h5py.File(path, "r") as f:
        f.visit(lambda n: names.append(n) if isinstance(f[n], h5py.Dataset) else None)
        attrs = set(f.attrs)
    return sorted(names), attrs


def test_tap_datasets_and_default_layout(tiny_cfg, capsys):
    plain, _ = ensure_cache(ExtractJob.of(tiny_cfg()), CPU)
    names, attrs = _datasets(plain.path)
    assert names == sorted(f"{s}/{d}" for s in ("train", "val") for d in ("features", "labels", "paths", "sha256"))
    assert not {"taps", "tap_dims"} & attrs and "taps" not in json.loads(h5py.File(plain.path)["/"].attrs["backbone"])
    capsys.readouterr()
    plan, entry = ensure_cache(ExtractJob.of(tiny_cfg(f"backbone.taps={TAPS}")), CPU)
    assert "taps changed: [pool] -> [pool, stage-1, stage-2, concat]" in entry["miss_reason"]
    assert "cache miss (taps changed: [pool] -> [pool, stage-1, stage-2, concat])" in capsys.readouterr().out
    names, _ = _datasets(plan.path)
    assert {f"train/taps/{t}" for t in ("stage-1", "stage-2", "concat")} <= set(names)
    fs = fc.open_cache(plan.path, plan.key)
    assert fs.taps == ["pool", "stage-1", "stage-2", "concat"]
    assert {t: fs.with_tap(t).feature_dim for t in fs.taps} == {"pool": 512, "stage-1": 512, "stage-2": 256,
                                                                 "concat": 1280}
    old = fc.read_cache(plain.path)
    new = fs.load()
    assert np.array_equal(old.train.features, new.train.features)  # pool: bitwise what the plain cache holds
    stage2 = fs.with_tap("stage-2").load().val.features
    assert np.array_equal(fs.with_tap("concat").load().val.features[:, 1024:], stage2)
    with fs.with_tap("stage-2").stream() as reader:  # streaming reads the chosen tap
        out = np.empty((3, reader.feature_dim), dtype=np.float32)
        assert reader.feature_dim == 256 and np.array_equal(reader.val.read_rows(0, 3, out), stage2[:3])


def test_narrowing_the_taps_copies_rows_without_a_forward_pass(tiny_cfg, capsys):
    wide, _ = ensure_cache(ExtractJob.of(tiny_cfg('backbone.taps=["stage-1", "stage-2", "concat"]')), CPU)
    wide_fs = fc.open_cache(wide.path)
    capsys.readouterr()
    for taps, extracted in (('["stage-2"]', 0), ('["pool"]', 0), ('["stage-2", "concat"]', 18)):
        plan, entry = ensure_cache(ExtractJob.of(tiny_cfg(f"backbone.taps={taps}")), CPU)
        assert entry["rows_extracted"] == extracted, taps  # concat of other stage taps is not the same concat
        fs = fc.open_cache(plan.path, plan.key)
        for tap in fs.taps if extracted == 0 else ():
            assert np.array_equal(fs.with_tap(tap).load().train.features, wide_fs.with_tap(tap).load().train.features)
    assert "0 of 18 images need the backbone (18 reused)" in capsys.readouterr().out
    from pipeline.cache.catalog import format_caches, list_caches

    listed = format_caches(list_caches(wide.path.parent), wide.path.parent)  # the caches command
    assert "resnet18 (taps pool, stage-1, stage-2, concat)" in listed and "resnet18 (taps pool, stage-2)" in listed


def test_tap_not_cached_fails_in_one_line(tiny_cfg):
    from pipeline.head import run_head

    plan, _ = ensure_cache(ExtractJob.of(tiny_cfg('backbone.taps=["stage-2"]')), CPU)
    for source in ('backbone.taps=["stage-2"]', f"features.file={plan.path}"):  # data.root, or the file alone
        with pytest.raises(PipelineError, match=r"^head.tap 'stage-3' is not in the cache '.*' \(cached taps: pool, "
                                                r"stage-2\): set head.tap to one of them, or add 'stage-3'"):
            run_head(tiny_cfg(source, "head.tap=stage-3"), CPU)
    with pytest.raises(PipelineError, match=r"^extract.train_views augments the pool features only"):
        run_head(tiny_cfg('backbone.taps=["stage-2"]', "head.tap=stage-2", "extract.train_views=2"), CPU)
    cfg = tiny_cfg(f"features.file={plan.path}", "head.tap=stage-2")
    run_head(cfg, CPU)
    saved = torch.load(cfg.run_dir / "head.pt", weights_only=False)
    assert saved["feature_dim"] == 256 and saved["backbone"]["tap"] == "stage-2"


def test_streamed_head_reads_the_tap(tiny_cfg):
    from pipeline.head import run_head

    cfg = tiny_cfg('backbone.taps=["stage-2"]', "head.tap=stage-2", "head.max_memory_gb=0.000001")
    entry = run_head(cfg, CPU)
    assert entry["streamed"] is True
    assert torch.load(cfg.run_dir / "head.pt", weights_only=False)["state_dict"]["weight"].shape == (2, 256)


def _val_images(root, preprocess, paths):
    t = eval_transform(preprocess)
    return torch.stack([t(Image.open(root / p).convert("RGB")) for p in paths])


def test_head_and_logistic_on_a_tap_and_predict_computes_it(tiny_cfg, image_root):
    from pipeline.head import run_head
    from pipeline.logistic import run_logistic
    from pipeline.head_outputs import ledger_path
    from pipeline.predictor import load_predictor
    from pipeline.report import val_predictions

    cfg = tiny_cfg('backbone.taps=["stage-2", "concat"]', "head.tap=concat")
    run_head(cfg, CPU)
    run_logistic(cfg, CPU)
    plan, _ = ensure_cache(ExtractJob.of(cfg), CPU)
    cached = fc.open_cache(plan.path).with_tap("concat").load().val
    for kind in ("head", "logistic"):
        predictor = load_predictor(cfg.run_dir, kind, CPU)
        assert predictor.artifact["feature_dim"] == 512 + 256 and predictor.artifact["backbone"]["tap"] == "concat"
        from_images = predictor.probs_from_images(_val_images(image_root, predictor.preprocess, cached.paths))
        from_cache = predictor.probs_from_features(cached.features)
        assert np.allclose(from_images, from_cache, atol=1e-4)
        assert np.allclose(val_predictions(cfg.run_dir, kind, CPU).probs, from_cache, atol=1e-6)  # report reads the tap
    ledger = [json.loads(line) for line in ledger_path(cfg.run.output_dir).read_text().splitlines()]
    assert [e["params"].get("tap") for e in ledger] == ["concat", "concat"]


def test_sweep_over_two_taps(tiny_cfg, capsys):
    from pipeline.sweep_stage import run_sweep

    cfg = tiny_cfg('backbone.taps=["stage-2"]', 'sweep.taps=["pool", "stage-2"]',
                   'sweep.grid={"ncm": {}, "knn": {"k": [3]}}')
    entry = run_sweep(cfg, CPU)
    out = capsys.readouterr().out
    assert "tap=pool" in out and "tap=stage-2" in out and entry["sweep"]["planned"] == 4
    winner = torch.load(cfg.run_dir / "head.pt", weights_only=False)
    tap = entry["params"]["tap"]
    assert winner["backbone"].get("tap", "pool") == tap and winner["head_config"]["tap"] == tap
    assert winner["feature_dim"] == {"pool": 512, "stage-2": 256}[tap]
    bad = tiny_cfg('backbone.taps=["stage-2"]', 'sweep.taps=["pool", "concat"]')
    with pytest.raises(PipelineError, match=r"^sweep.taps 'concat' is not in the cache"):
        run_sweep(bad, CPU)


def test_api_load_features_with_a_tap(tmp_path, image_root):
    from pipeline import api

    o = {k: v for k, v in (s.split("=", 1) for s in tiny_overrides(tmp_path, image_root))}
    fs = api.load_features(str(image_root), "resnet18", weights="none", image_size=32, cache_dir=o["extract.cache_dir"],
                           output_dir=o["run.output_dir"], run_name="api", device="cpu", tap="stage-2")
    assert fs.train.X.shape[1] == 256 and fs.backbone["tap"] == "stage-2" and fs.backbone["taps"] == ["pool", "stage-2"]
    from pipeline.ledger import read_ledger

    fitted = api.fit(api.NCMHead(), fs)          # its ledger line says which tap it was trained on
    [entry] = read_ledger(fitted["ledger"]).entries
    assert entry.params == {"tap": "stage-2"} and entry.source == "api"
