"""The head zoo cores: kNN and NCM against brute-force numpy, trained probes on toy sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.probes import (KNNConfig, LinearConfig, MLPConfig, NCMConfig, ProbeError, balanced_weights,
                             build_probe, load_probe, make_config)
from tests.reference import fit_reference


def blobs(n_per_class=20, num_classes=3, n_features=6, spread=0.3, seed=0):
    """Well separated Gaussian blobs: X (n, n_features) float32, y (n,)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (num_classes, n_features))
    y = np.repeat(np.arange(num_classes), n_per_class)
    X = centres[y] + rng.normal(0, spread, (len(y), n_features))
    return X.astype(np.float32), y


def knn_reference(train, labels, test, k, temperature, num_classes):
    """DINO's weighted k-NN, one query at a time in float64."""
    bank = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = np.zeros((len(test), num_classes))
    for i, q in enumerate(test / np.linalg.norm(test, axis=1, keepdims=True)):
        sims = bank @ q
        nearest = np.argsort(-sims)[:k]
        for j in nearest:
            out[i, labels[j]] += np.exp(sims[j] / temperature)
        out[i] /= out[i].sum()
    return out


def ncm_reference(train, labels, test, temperature, num_classes):
    mean = train.mean(0)
    z = train - mean
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    centroids = np.stack([z[labels == c].mean(0) for c in range(num_classes)])
    q = test - mean
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d2 = ((q[:, None, :] - centroids[None]) ** 2).sum(2)
    logits = -d2 / (2 * temperature)
    p = np.exp(logits - logits.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), d2.argmin(1)


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (7, 0.5), (100, 0.02)])
def test_knn_matches_brute_force(k, temperature):
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(12, 8)).astype(np.float32)
    labels = rng.integers(0, 4, 40)
    probe = build_probe("knn", {"k": k, "temperature": temperature}).fit(train, labels)
    want = knn_reference(train.astype(np.float64), labels, test.astype(np.float64), min(k, 40), temperature, 4)
    np.testing.assert_allclose(probe.predict_proba(test), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(probe.predict(test), want.argmax(1))


def test_knn_chunks_queries_like_one_block(monkeypatch):
    rng = np.random.default_rng(2)
    train, test = rng.normal(size=(30, 5)), rng.normal(size=(9, 5))
    labels = rng.integers(0, 3, 30)
    whole = build_probe("knn", {"k": 4}).fit(train, labels).predict_proba(test)
    monkeypatch.setattr("pipeline.probes.KNN_SIM_BYTES", 4 * 30 * 2)  # two query rows per block
    np.testing.assert_allclose(build_probe("knn", {"k": 4}).fit(train, labels).predict_proba(test), whole, rtol=1e-5)


def test_ncm_matches_brute_force():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(45, 7)) + 2.0   # an offset that centring must remove
    labels = np.repeat(np.arange(3), 15)
    test = rng.normal(size=(10, 7)) + 2.0
    probe = build_probe("ncm", {"temperature": 0.1}).fit(train, labels)
    want_p, want_class = ncm_reference(train, labels, test, 0.1, 3)
    np.testing.assert_allclose(probe.predict_proba(test), want_p, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(probe.predict(test), want_class)


def test_ncm_never_predicts_a_class_without_train_rows():
    X, y = blobs(num_classes=2)
    probe = build_probe("ncm", num_classes=3).fit(X, y)
    proba = probe.predict_proba(X)
    assert proba.shape == (len(X), 3) and np.all(proba[:, 2] == 0)


@pytest.mark.parametrize("head_type", ["linear", "mlp", "knn", "ncm"])
def test_every_probe_learns_separable_blobs_and_gives_probabilities(head_type):
    X, y = blobs(seed=4)
    Xv, yv = blobs(n_per_class=8, seed=4)[0] + 0, blobs(n_per_class=8, seed=4)[1]
    params = {"epochs": 5, "batch_size": 8, "lr": 0.05} if head_type in ("linear", "mlp") else {}
    if head_type == "mlp":
        params["hidden"] = 16
    probe = build_probe(head_type, params).fit(X, y, Xv, yv)
    proba = probe.predict_proba(Xv)
    assert proba.shape == (len(Xv), 3) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert (probe.predict(Xv) == yv).mean() == 1.0
    assert probe.result.best_acc == 1.0


def test_mlp_learns_xor_that_a_linear_probe_cannot():
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, (200, 2)).astype(np.float32)
    y = ((X[:, 0] > 0) ^ (X[:, 1] > 0)).astype(int)
    common = {"epochs": 20, "batch_size": 25, "lr": 0.3, "step_size": 15}
    mlp = build_probe("mlp", {**common, "hidden": 32}).fit(X, y)
    linear = build_probe("linear", common).fit(X, y)
    assert (mlp.predict(X) == y).mean() > 0.9
    assert (linear.predict(X) == y).mean() < 0.75


def reference_linear_head(X, y, Xv, yv, cfg: LinearConfig, seed: int):
    """The head stage's loop written out with plain torch (tests/reference.py): its best epoch's state, top-1, epoch."""
    from tests.reference import fit_reference

    num_classes = int(y.max()) + 1
    ref = fit_reference(lambda: nn.Linear(X.shape[1], num_classes), X, y, Xv, yv, cfg, seed, num_classes)
    return ref.best, ref.best_acc, ref.best_epoch


def test_linear_probe_is_the_head_stage_loop():
    X, y = blobs(n_per_class=10, spread=2.5, seed=6)   # overlapping: the best epoch is not trivially the first
    Xv, yv = blobs(n_per_class=6, spread=2.5, seed=7)
    cfg = LinearConfig(epochs=9, batch_size=4, lr=0.01, step_size=3, weight_decay=1e-3)
    probe = build_probe("linear", vars(cfg), seed=3).fit(X, y, Xv, yv)
    want, acc, epoch = reference_linear_head(X, y, Xv, yv, cfg, seed=3)
    assert (probe.result.best_epoch, probe.result.best_acc) == (epoch, pytest.approx(acc))
    for k, v in probe.model.state_dict().items():
        torch.testing.assert_close(v, want[k])


def test_best_epoch_is_the_first_best_on_val():
    X, y = blobs(n_per_class=10, spread=2.5, seed=8)
    Xv, yv = blobs(n_per_class=6, spread=2.5, seed=9)
    probe = build_probe("linear", {"epochs": 8, "lr": 0.02}).fit(X, y, Xv, yv)
    accs = [h["val_acc"] for h in probe.result.history]
    assert probe.result.best_acc == max(accs)
    assert probe.result.best_epoch == accs.index(max(accs)) + 1
    assert [h["lr"] for h in probe.result.history][:8] == pytest.approx([0.02] * 7 + [0.002])


def test_without_val_the_last_epoch_is_kept():
    X, y = blobs(seed=10)
    probe = build_probe("linear", {"epochs": 3}).fit(X, y)
    assert probe.result.best_epoch == 3 and probe.result.best_acc is None
    assert all("val_acc" not in h for h in probe.result.history)


def test_balanced_weights_are_scikit_learns_and_change_the_loss():
    from sklearn.utils.class_weight import compute_class_weight

    rng = np.random.default_rng(11)
    y = np.array([0] * 30 + [1] * 6 + [2] * 4)
    X = rng.normal(size=(len(y), 4)).astype(np.float32) + y[:, None]
    np.testing.assert_allclose(balanced_weights(torch.as_tensor(y), 3).numpy(),
                               compute_class_weight("balanced", classes=np.arange(3), y=y), rtol=1e-6)
    assert balanced_weights(torch.as_tensor(y), 4)[3] == 0   # absent class
    plain = build_probe("linear", {"epochs": 2}).fit(X, y, X, y)
    balanced = build_probe("linear", {"epochs": 2, "class_weight": "balanced"}).fit(X, y, X, y)
    assert plain.result.history[0]["train_loss"] != pytest.approx(balanced.result.history[0]["train_loss"], rel=1e-3)
    # the weighted val loss is sum(w_y * nll) / sum(w_y): recompute it from the final model
    logits = torch.as_tensor(np.log(balanced.predict_proba(X)))
    w = balanced_weights(torch.as_tensor(y), 3)
    want = nn.functional.cross_entropy(logits, torch.as_tensor(y), weight=w).item()
    last = balanced.result.history[balanced.result.best_epoch - 1]["val_loss"]
    assert last == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("head_type,params", [("linear", {"epochs": 2}), ("mlp", {"epochs": 2, "hidden": 8}),
                                              ("knn", {"k": 3}), ("ncm", {})])
def test_state_round_trip_predicts_the_same(head_type, params):
    X, y = blobs(seed=12)
    probe = build_probe(head_type, params, seed=2).fit(X, y, X, y)
    again = load_probe(probe.state())
    assert type(again) is type(probe) and again.cfg == probe.cfg
    np.testing.assert_array_equal(again.predict_proba(X), probe.predict_proba(X))


def test_configs_have_the_head_stages_defaults():
    assert vars(LinearConfig()) == {"epochs": 25, "batch_size": 4, "lr": 0.001, "momentum": 0.9,
                                    "weight_decay": 0.0, "step_size": 7, "gamma": 0.1, "class_weight": "none"}
    assert MLPConfig().hidden > 0 and KNNConfig() == KNNConfig(k=20, temperature=0.07)
    assert NCMConfig().temperature > 0


@pytest.mark.parametrize("head_type,params,needle", [
    ("linear", {"lrr": 0.1}, "linear has no parameter 'lrr' (its parameters: epochs, batch_size, lr"),
    ("knn", {"k": 0}, "knn.k = 0: must be an integer > 0"),
    ("mlp", {"dropout": 1.0}, "mlp.dropout = 1.0: must be a number in [0, 1)"),
    ("linear", {"class_weight": "auto"}, "linear.class_weight = 'auto': must be one of none, balanced"),
    ("svm", {}, "head type 'svm' is not known (use one of: linear, mlp, knn, ncm)"),
])
def test_bad_parameters_name_the_key_and_what_is_allowed(head_type, params, needle):
    with pytest.raises(ProbeError, match=None) as err:
        make_config(head_type, params)
    assert needle in str(err.value) and isinstance(err.value, PipelineError)


def test_bad_inputs_are_clear_errors():
    X, y = blobs(seed=13)
    with pytest.raises(ProbeError, match="not fitted yet"):
        build_probe("ncm").predict(X)
    with pytest.raises(ProbeError, match=r"y must have shape \(60,\)"):
        build_probe("knn").fit(X, y[:-1])
    with pytest.raises(ProbeError, match="X has 5 features but the knn probe was fitted on 6"):
        build_probe("knn").fit(X, y).predict(X[:, :5])
    with pytest.raises(ProbeError, match="labels go up to 2 but num_classes is 2"):
        build_probe("ncm", num_classes=2).fit(X, y)
    with pytest.raises(ProbeError, match="integer class indices"):
        build_probe("ncm").fit(X, np.array(["a"] * len(X)))


def test_every_parameter_has_a_help_text():
    from pipeline.probes import CONFIGS, PARAM_HELP

    for head_type in CONFIGS:
        for name in make_config(head_type).__dataclass_fields__:
            assert PARAM_HELP.get(name), f"{head_type}.{name} has no help text"


def reference_mlp(X, y, Xv, yv, cfg: MLPConfig, seed: int, num_classes: int):
    """nn.Sequential trained by the plain-torch reference (tests/reference.py): best state, best epoch, history."""
    def build():
        return nn.Sequential(nn.Linear(X.shape[1], cfg.hidden), nn.ReLU(), nn.Dropout(0.0),
                             nn.Linear(cfg.hidden, num_classes))

    ref = fit_reference(build, X, y, Xv, yv, cfg, seed, num_classes)
    return ref.best, ref.best_epoch, ref.history


@pytest.mark.parametrize("window, momentum, weight_decay, class_weight", [
    (3, 0.9, 1e-3, "balanced"), (4, 0.0, 0.0, "none"), (64, 0.5, 1e-2, "none"), (1, 0.0, 1e-3, "balanced")])
def test_mlp_hidden_layer_on_lazy_windows_equals_torch_optim(monkeypatch, window, momentum, weight_decay,
                                                            class_weight):
    """An mlp probe (dropout 0) trains its hidden layer on lazy_sgd's windows (here 3 or 4 steps into a
    10-step epoch whose last batch has 2 rows, one step, or the whole epoch): the weights, best epoch and
    every history entry of nn.Sequential + torch.optim.SGD + StepLR with the same seed and batch order."""
    from pipeline import lazy_sgd

    monkeypatch.setattr(lazy_sgd, "WINDOW_STEPS", window)
    X, y = (a[:38] for a in blobs(n_per_class=13, spread=2.0, seed=11))        # 38 rows: a last batch of 2
    Xv, yv = blobs(n_per_class=5, spread=2.0, seed=12)
    cfg = MLPConfig(epochs=5, batch_size=4, lr=0.05, momentum=momentum, weight_decay=weight_decay, step_size=2,
                    gamma=0.5, hidden=16, class_weight=class_weight)
    probe = build_probe("mlp", vars(cfg), seed=4).fit(X, y, Xv, yv)
    want, epoch, history = reference_mlp(X, y, Xv, yv, cfg, seed=4, num_classes=3)
    for k, v in probe.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5)
    assert probe.result.best_epoch == epoch
    mine = [(e["train_loss"], e["train_acc"], e["val_loss"], e["val_acc"]) for e in probe.result.history]
    np.testing.assert_allclose(np.array(mine), np.array(history), rtol=1e-4, atol=1e-6)
    assert [e["lr"] for e in probe.result.history] == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.0125])


def test_a_dropout_mlp_trains_on_the_lazy_engine_on_the_cpu_with_fit_modules_masks():
    """Alone, an MLP with dropout draws on the CPU the masks fit_module draws (its own generator, seeded as
    fit_module seeds the global one) and ends where autograd + torch.optim end; off the CPU, where a fused
    kernel draws the masks, it keeps fit_module."""
    from pipeline.lazy_mlp import fit_mlp_lazy
    from pipeline.probes import fit_module

    assert build_probe("mlp", {"dropout": 0.2}).trainer() is fit_mlp_lazy is build_probe("mlp", device="cuda").trainer()
    assert build_probe("mlp", {"dropout": 0.2}, device="cuda").trainer() is fit_module
    X, y = (a[:38] for a in blobs(n_per_class=13, spread=2.0, seed=15))        # 38 rows: a last batch of 2
    Xv, yv = blobs(n_per_class=5, spread=2.0, seed=16)
    params = {"hidden": 16, "dropout": 0.4, "epochs": 4, "batch_size": 4, "lr": 0.05, "step_size": 2}
    lazy = build_probe("mlp", params, seed=6).fit(X, y, Xv, yv)
    alone = build_probe("mlp", params, seed=6)
    alone.trainer = lambda: fit_module
    alone.fit(X, y, Xv, yv)
    for k, v in lazy.model.state_dict().items():
        torch.testing.assert_close(v, alone.model.state_dict()[k], rtol=1e-4, atol=1e-5)
    assert lazy.result.best_epoch == alone.result.best_epoch
    np.testing.assert_allclose([[e["train_loss"], e["val_loss"]] for e in lazy.result.history],
                               [[e["train_loss"], e["val_loss"]] for e in alone.result.history], rtol=1e-4, atol=1e-6)
    no_dropout = build_probe("mlp", {**params, "dropout": 0.0}, seed=6).fit(X, y, Xv, yv)
    assert (no_dropout.model[0].weight - lazy.model[0].weight).abs().max() > 1e-3         # the masks mattered


def test_the_linear_probe_trains_on_the_joint_engine_across_windows(monkeypatch):
    """build_probe('linear').fit (and so the API's LinearHead) runs joint.py's engine with one head; with
    windows of 3 steps (30 rows in batches of 4: 8 steps, the last of 2 rows; 3 windows) it still
    trains the reference loop's weights and picks its best epoch."""
    from pipeline import lazy_sgd
    from pipeline.joint import fit_linear

    monkeypatch.setattr(lazy_sgd, "WINDOW_STEPS", 3)
    X, y = blobs(n_per_class=10, spread=2.5, seed=6)
    Xv, yv = blobs(n_per_class=6, spread=2.5, seed=7)
    cfg = LinearConfig(epochs=6, batch_size=4, lr=0.01, step_size=2, weight_decay=1e-3, momentum=0.5)
    probe = build_probe("linear", vars(cfg), seed=3)
    assert probe.trainer() is fit_linear
    probe.fit(X, y, Xv, yv)
    want, acc, epoch = reference_linear_head(X, y, Xv, yv, cfg, seed=3)
    assert (probe.result.best_epoch, probe.result.best_acc) == (epoch, pytest.approx(acc))
    for k, v in probe.model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- probes fitted together (sweeps)
@pytest.mark.parametrize("sim_bytes", [None, 4 * 40 * 3])        # one block, or three val rows per block
def test_a_knn_group_gives_every_config_the_probabilities_of_its_probe_alone(monkeypatch, sim_bytes):
    """One top-k_max search serves every (k, temperature): each config's probabilities are its own probe's."""
    from pipeline.probe_groups import fit_knn_group

    if sim_bytes:
        monkeypatch.setattr("pipeline.probes.KNN_SIM_BYTES", sim_bytes)
    rng = np.random.default_rng(3)
    train, val = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(13, 8)).astype(np.float32)
    labels, yv = rng.integers(0, 4, 40), rng.integers(0, 4, 13)
    configs = [KNNConfig(k=k, temperature=t) for k in (1, 5, 7, 100) for t in (0.03, 0.5)]
    fitted = fit_knn_group(configs, torch.as_tensor(train), torch.as_tensor(labels), torch.as_tensor(val),
                           torch.as_tensor(yv), num_classes=4)
    assert [p.cfg for p, _ in fitted] == configs
    for cfg, (probe, proba) in zip(configs, fitted):
        alone = build_probe("knn", vars(cfg), num_classes=4).fit(train, labels, val, yv)
        np.testing.assert_allclose(proba, alone.predict_proba(val), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(proba.argmax(1), alone.predict(val))
        np.testing.assert_allclose(probe.predict_proba(val), proba, rtol=1e-6, atol=1e-7)   # the saved model
        assert probe.result.best_acc == pytest.approx(alone.result.best_acc)


def test_an_ncm_group_gives_every_temperature_the_probabilities_of_its_probe_alone():
    from pipeline.probe_groups import fit_ncm_group

    X, y = blobs(n_per_class=8, num_classes=4, spread=2.0, seed=8)
    Xv, yv = blobs(n_per_class=5, num_classes=4, spread=2.0, seed=9)
    configs = [NCMConfig(temperature=t) for t in (0.03, 0.07, 1.0)]
    fitted = fit_ncm_group(configs, torch.as_tensor(X), torch.as_tensor(y), torch.as_tensor(Xv), torch.as_tensor(yv),
                           num_classes=4)
    for cfg, (probe, proba) in zip(configs, fitted):
        alone = build_probe("ncm", vars(cfg)).fit(X, y, Xv, yv)
        np.testing.assert_allclose(proba, alone.predict_proba(Xv), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(probe.predict_proba(Xv), proba, rtol=1e-6, atol=1e-7)
        assert probe.cfg == cfg and probe.result.best_acc == pytest.approx(alone.result.best_acc)


@pytest.mark.parametrize("dual", ["off", "on"])
def test_mlps_trained_together_equal_each_mlp_trained_alone(monkeypatch, dual):
    """Two MLPs with their own hidden width, lr, momentum, weight decay and StepLR, trained as one
    LazyLayer over windows of 3 steps (in primal or dual coordinates: val through the cross Gram, best
    epochs kept as coordinates), end with the weights, history and best epoch of each alone."""
    from pipeline import lazy_sgd
    from pipeline.probe_groups import fit_mlp_group

    monkeypatch.setattr(lazy_sgd, "WINDOW_STEPS", 3)
    monkeypatch.setattr(lazy_sgd, "DUAL", dual)
    X, y = (a[:38] for a in blobs(n_per_class=13, spread=2.0, seed=11))        # 38 rows: a last batch of 2
    Xv, yv = blobs(n_per_class=5, spread=2.0, seed=12)
    shared = {"epochs": 5, "batch_size": 4, "class_weight": "balanced"}
    configs = [MLPConfig(hidden=16, lr=0.05, momentum=0.9, weight_decay=1e-3, step_size=2, gamma=0.5, **shared),
               MLPConfig(hidden=8, lr=0.2, momentum=0.0, weight_decay=0.0, step_size=3, gamma=0.1, **shared)]
    fitted = fit_mlp_group(configs, *(torch.as_tensor(a) for a in (X, y, Xv, yv)), num_classes=3, seed=4)
    for cfg, (probe, proba) in zip(configs, fitted):
        alone = build_probe("mlp", vars(cfg), seed=4).fit(X, y, Xv, yv)
        for k, v in probe.model.state_dict().items():
            torch.testing.assert_close(v, alone.model.state_dict()[k], rtol=1e-4, atol=1e-5)
        assert probe.result.best_epoch == alone.result.best_epoch
        keys = ("lr", "train_loss", "train_acc", "val_loss", "val_acc")
        mine = [[e[k] for k in keys] for e in probe.result.history]
        np.testing.assert_allclose(np.array(mine), [[e[k] for k in keys] for e in alone.result.history],
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(proba, alone.predict_proba(Xv), rtol=1e-4, atol=1e-5)


def test_mlps_with_dropout_trained_together_draw_the_masks_each_draws_alone():
    """Each MLP of a joint run draws its dropout masks from its own generator, seeded as fit_module seeds
    the global one: with dropout 0.3, 0.5 and 0, each ends where fit_module (autograd, torch.optim) ends alone."""
    from pipeline.probe_groups import fit_mlp_group
    from pipeline.probes import fit_module

    X, y = (a[:38] for a in blobs(n_per_class=13, spread=2.0, seed=13))        # 38 rows: a last batch of 2
    Xv, yv = blobs(n_per_class=5, spread=2.0, seed=14)
    shared = {"epochs": 4, "batch_size": 4, "lr": 0.05, "step_size": 2}
    configs = [MLPConfig(hidden=16, dropout=0.3, **shared), MLPConfig(hidden=8, dropout=0.5, momentum=0.5, **shared),
               MLPConfig(hidden=12, **shared)]
    fitted = fit_mlp_group(configs, *(torch.as_tensor(a) for a in (X, y, Xv, yv)), num_classes=3, seed=5)
    for cfg, (probe, proba) in zip(configs, fitted):
        alone = build_probe("mlp", vars(cfg), seed=5)
        alone.trainer = lambda: fit_module
        alone.fit(X, y, Xv, yv)
        for k, v in probe.model.state_dict().items():
            torch.testing.assert_close(v, alone.model.state_dict()[k], rtol=1e-4, atol=1e-5)
        assert probe.result.best_epoch == alone.result.best_epoch
        mine = [[e["train_loss"], e["train_acc"], e["val_loss"]] for e in probe.result.history]
        np.testing.assert_allclose(mine, [[e["train_loss"], e["train_acc"], e["val_loss"]]
                                          for e in alone.result.history], rtol=1e-4, atol=1e-6)
    no_dropout = build_probe("mlp", {**vars(configs[0]), "dropout": 0.0}, seed=5).fit(X, y, Xv, yv)
    assert (no_dropout.model[0].weight - fitted[0][0].model[0].weight).abs().max() > 1e-3   # the masks mattered


def test_only_mlps_that_share_the_batches_train_together():
    from pipeline.probe_groups import fit_mlp_group, mlp_group_key

    assert mlp_group_key(MLPConfig(dropout=0.2)) == mlp_group_key(MLPConfig())         # the CPU repeats the masks
    assert mlp_group_key(MLPConfig(dropout=0.2), "cuda") is None                        # a fused kernel: alone
    X, y = blobs(n_per_class=4)
    with pytest.raises(ProbeError, match="must share epochs, batch_size, class_weight"):
        fit_mlp_group([MLPConfig(epochs=2), MLPConfig(epochs=3)], torch.as_tensor(X), torch.as_tensor(y),
                      torch.as_tensor(X), torch.as_tensor(y), 3)
