"""The probes' training engines against plain torch (the MLP's lazy windows, the linear probe on joint.py),
and probes fitted together in a sweep's groups against each probe fitted alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.probes import KNNConfig, LinearConfig, MLPConfig, NCMConfig, ProbeError, build_probe
from tests.reference import blobs, reference_linear_head, reference_mlp


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
