"""The head zoo cores: kNN and NCM against brute-force numpy, trained probes on toy sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import PipelineError
from pipeline.probes import (KNNConfig, LinearConfig, MLPConfig, NCMConfig, ProbeError, balanced_weights,
                             build_probe, load_probe, make_config)
from tests.reference import blobs, reference_linear_head


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
