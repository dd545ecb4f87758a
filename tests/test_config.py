import json
from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text):
    p = tmp_path / "p.json"
    p.write_text(text)
    return p


def test_repo_params_load_and_have_required_keys():
    cfg = load_config(REPO / "params.json")
    for dotted in ("data.root", "backbone.name", "backbone.weights", "backbone.image_size", "head.epochs",
                   "finetune.epochs", "run.name", "run.output_dir", "run.device", "run.seed", "run.stages"):
        section, key = dotted.split(".")
        assert hasattr(getattr(cfg, section), key), dotted
    assert cfg.backbone.name == "efficientnet_lite0"


def test_defaults_follow_the_tutorial():
    head = Config().head
    assert (head.lr, head.momentum, head.step_size, head.gamma, head.epochs) == (0.001, 0.9, 7, 0.1, 25)


def test_overrides_parse_types():
    cfg = load_config(None, ["head.lr=0.01", "backbone.name=resnet18", "run.name=123",
                             "backbone.image_size=null", "finetune.augment=false", "run.stages=[\"head\"]"])
    assert cfg.head.lr == 0.01 and cfg.backbone.name == "resnet18" and cfg.run.name == "123"
    assert cfg.backbone.image_size is None and cfg.finetune.augment is False and cfg.run.stages == ["head"]


def test_head_zoo_and_sweep_keys_parse():
    cfg = load_config(None, ["head.type=mlp", "head.hidden=64", "head.class_weight=balanced",
                             'sweep.grid={"knn": {"k": [5, 10]}, "ncm": {}}', "leaderboard.all=true"])
    assert (cfg.head.type, cfg.head.hidden, cfg.head.class_weight) == ("mlp", 64, "balanced")
    assert cfg.sweep.grid == {"knn": {"k": [5, 10]}, "ncm": {}} and cfg.leaderboard.all is True
    assert set(Config().sweep.grid) == {"linear", "knn", "ncm", "logistic", "mlp"}  # the example grid


def test_new_sections_have_working_defaults():
    cfg = Config()
    assert (cfg.backbone.cut, cfg.head.type, cfg.finetune.init_head, cfg.finetune.backbone_lr_mult) == \
        ("pool", "linear", "none", 1.0)
    assert cfg.benchmark.methods == ["head", "logistic", "finetune"] and cfg.benchmark.backbones == []
    assert cfg.predict.model == "head" and cfg.report.enabled is True
    assert load_config(None, ["run.stages=[\"benchmark\", \"report\"]"]).run.stages == ["benchmark", "report"]


def test_int_accepted_for_float():
    assert load_config(None, ["head.lr=1"]).head.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("head.lrr=0.1", "unknown key 'head.lrr'"),
    ("heads.lr=0.1", "unknown section 'heads' .did you mean 'head'.. .known: run, "),
    ("zzz.lr=0.1", "unknown section 'zzz' .known: run, "),
    ("head.lr=fast", "head.lr: expected a number"),
    ("head.lr=-1", "head.lr: must be > 0"),
    ("head.epochs=2.5", "head.epochs: expected an integer"),
    ("head.epochs=true", "head.epochs: expected an integer"),
    ("backbone.image_size=-5", "backbone.image_size: must be > 0"),
    ("finetune.augment=yes", "finetune.augment: expected true or false"),
    ("extract.dtype=int8", "extract.dtype: 'int8' is not one of float32, float16"),
    ("run.stages=[\"train\"]", "run.stages[0]: 'train' is not one of"),
    ("head.momentum=1", "head.momentum: must be < 1"),
    ("logistic.c_grid=[]", "logistic.c_grid: must not be empty"),
    ("head.lr", "expected section.key=value"),
    ("backbone.cut=fc7", "backbone.cut: 'fc7' is not one of pool, conv"),
    ("head.type=svm", "head.type: 'svm' is not one of linear, mlp, knn, ncm, classifier"),
    ("head.class_weight=auto", "head.class_weight: 'auto' is not one of none, balanced"),
    ("head.dropout=1", "head.dropout: must be < 1"),
    ("head.k=0", "head.k: must be > 0"),
    ("sweep.grid={\"svm\": {}}", "sweep.grid: unknown head type 'svm' .use: linear, mlp, knn, ncm, logistic."),
    ("sweep.grid={\"knn\": [5]}", "sweep.grid.knn: expected an object {parameter: [values]}"),
    ("sweep.grid={\"knn\": {\"k\": []}}", "sweep.grid.knn.k: expected a value or a non-empty list of values"),
    ("sweep.grid={}", "sweep.grid: expected a non-empty object"),
    ("sweep.grid=fast", "sweep.grid: expected a non-empty object"),
    ("leaderboard.all=yes", "leaderboard.all: expected true or false"),
    ("finetune.init_head=yes", "finetune.init_head: 'yes' is not one of none, cached"),
    ("finetune.backbone_lr_mult=0", "finetune.backbone_lr_mult: must be > 0"),
    ("finetune.backbone_lr_mult=2", "finetune.backbone_lr_mult: must be <= 1"),
    ("predict.model=svm", "predict.model: 'svm' is not one of head, logistic, finetune"),
    ("benchmark.methods=[\"svm\"]", "benchmark.methods[0]: 'svm' is not one of head, logistic, finetune"),
    ("benchmark.methods=[]", "benchmark.methods: must not be empty"),
    ("benchmark.finetune_epochs=0", "benchmark.finetune_epochs: must be > 0"),
    ("run.stages=[\"predict\"]", "run.stages[0]: 'predict' is not one of"),  # predict needs paths
    ("report.grid_images=0", "report.grid_images: must be > 0"),
    # the values the code could not handle: each bounded, the message names the key
    ("run.seed=4294967296", "run.seed: must be <= 4294967295"),
    ("run.num_threads=100000", "run.num_threads: must be <= 1024"),
    ("head.lr=1e300", "head.lr: must be <= 10"),
    ("finetune.lr=1e9", "finetune.lr: must be <= 10"),
    ("backbone.image_size=10000", "backbone.image_size: must be <= 1024"),
    ("run.name=" + "x" * 300, "run.name: at most 100 characters, got 300"),
    ("run.name=/abs", "run.name: '/abs' must be a relative folder name inside run.output_dir"),
    ("run.name=../../x", "run.name: '../../x' must be a relative folder name"),
    ("logistic.c_grid=[1e300]", "logistic.c_grid[0]: must be <= 1000000.0"),
    ("data.rot=x", "unknown key 'data.rot' .did you mean 'data.root'."),
    ("logistic.c_grid=5", "logistic.c_grid: expected a list of float, got 5"),
    ("logistic.c_grid=[1, -1]", "logistic.c_grid[1]: must be > 0, got -1.0"),
    ('backbone.name=""', "backbone.name: must not be empty"),
    ("head.lr.x=1", "--set 'head.lr.x=1': expected section.key=value .e.g. head.lr=0.01."),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, [override])


@pytest.mark.parametrize("text, message", [("[1, 2]", "the top level must be an object of sections"),
                                           ('{"heads": {"lr": 0.1}}', "unknown section 'heads' .did you mean 'head'.. "
                                            ".known: run, data, ")])
def test_a_file_that_is_not_sections_names_itself(tmp_path, text, message):
    path = tmp_path / "p.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"{path}: {message}"):
        load_config(path)


def test_unknown_key_in_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'head.learning_rate'"):
        load_config(write(tmp_path, '{"head": {"learning_rate": 0.1}}'))


def test_nan_and_infinity_rejected(tmp_path):
    with pytest.raises(ConfigError, match="NaN is not allowed"):
        load_config(write(tmp_path, '{"head": {"lr": NaN}}'))
    with pytest.raises(ConfigError, match="Infinity is not allowed"):
        load_config(write(tmp_path, '{"head": {"lr": Infinity}}'))


def test_duplicate_key_rejected(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(write(tmp_path, '{"head": {"lr": 0.1, "lr": 0.2}}'))


def test_invalid_json_names_line(tmp_path):
    with pytest.raises(ConfigError, match="line 3"):
        load_config(write(tmp_path, '{\n "head": {"lr": 0.1},\n "run": {,}\n}'))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read params file"):
        load_config(tmp_path / "nope.json")


def test_section_must_be_object(tmp_path):
    with pytest.raises(ConfigError, match="head: expected an object"):
        load_config(write(tmp_path, '{"head": 3}'))


def test_roundtrip_through_json(tmp_path):
    cfg = load_config(None, ["head.lr=0.05", "run.seed=7"])
    assert load_config(write(tmp_path, json.dumps(cfg.to_dict()))) == cfg


def test_params_json_is_a_copy_of_the_defaults():
    """Defaults live in the dataclasses; params.json shows every key with the same value (so --help is what runs)."""
    import json
    from pathlib import Path

    from pipeline.config import Config

    shipped = json.loads((Path(__file__).resolve().parents[1] / "params.json").read_text())
    assert shipped == Config().to_dict()
    assert load_config(Path(__file__).resolve().parents[1] / "params.json") == Config()


def test_help_prints_the_defaults_that_run():
    from pipeline.config import Config, describe_keys

    text = describe_keys()
    defaults = Config()
    assert f"finetune.epochs (default {defaults.finetune.epochs})" in text
    assert f"backbone.image_size (default {json.dumps(defaults.backbone.image_size)})" in text
    assert f"data.root (default {json.dumps(defaults.data.root)})" in text
    assert "features.file (default null): a cache file written by extract" in text


def test_json_nested_too_deep_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="JSON nested too deeply"):
        load_config(write(tmp_path, "[" * 100_000 + "]" * 100_000))


def test_trailing_comma_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"line 1 column 21: .*\(a trailing comma\?\)"):
        load_config(write(tmp_path, '{"head": {"lr": 0.1,}}'))


def test_every_numeric_key_has_an_upper_bound():
    """Every int/float key is bounded above (or is a probability-like value bounded by lt/le)."""
    import dataclasses

    from pipeline.config import SECTIONS

    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            tp = str(f.type)
            if ("int" in tp or "float" in tp) and "list" not in tp:
                assert "le" in f.metadata or "lt" in f.metadata, f"{name}.{f.name} has no upper bound"
