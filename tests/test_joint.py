"""Linear heads trained together equal the same heads trained alone."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.joint import predict_proba_heads, shared_key, train_linear_heads
from pipeline.probes import LinearConfig, ProbeError
from tests.reference import fit_reference


def toy(n=36, n_features=5, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, n)
    X = rng.normal(size=(n, n_features)) + 1.5 * np.eye(num_classes, n_features)[y]
    return X.astype(np.float32), y


def train_alone(X, y, Xv, yv, cfg: LinearConfig, seed: int, num_classes: int):
    """One head with plain torch (tests/reference.py): the best val epoch's state, top-1 and epoch."""
    ref = fit_reference(lambda: nn.Linear(X.shape[1], num_classes), X, y, Xv, yv, cfg, seed, num_classes)
    return ref.best, ref.best_acc, ref.best_epoch


GRID = [LinearConfig(epochs=6, batch_size=4, lr=lr, weight_decay=wd, momentum=m, step_size=s, gamma=g)
        for lr, wd, m, s, g in [(0.001, 0.0, 0.9, 7, 0.1), (0.01, 1e-3, 0.9, 2, 0.5), (0.1, 0.0, 0.0, 3, 0.1),
                                (0.03, 1e-2, 0.5, 1, 0.9), (0.3, 1e-4, 0.9, 4, 0.1)]]


@pytest.mark.parametrize("class_weight, dual", [("none", "off"), ("balanced", "off"), ("balanced", "on")])
def test_each_joint_head_equals_the_head_trained_alone(monkeypatch, class_weight, dual):
    """Best val epoch, its weights and lr history of every head, in primal and in dual coordinates (val
    scored through the cross Gram, best epochs kept as coordinates)."""
    from pipeline import lazy_sgd

    monkeypatch.setattr(lazy_sgd, "DUAL", dual)
    X, y = toy(seed=1)
    Xv, yv = toy(n=20, seed=2)
    grid = [LinearConfig(**{**vars(c), "class_weight": class_weight}) for c in GRID]
    joint = train_linear_heads(X, y, Xv, yv, grid, num_classes=3, seed=5)
    assert joint.weight.shape == (5, 3, 5) and len(joint.results) == 5
    for h, cfg in enumerate(grid):
        want, acc, epoch = train_alone(X, y, Xv, yv, cfg, seed=5, num_classes=3)
        torch.testing.assert_close(joint.weight[h], want["weight"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(joint.bias[h], want["bias"], rtol=1e-4, atol=1e-5)
        assert (joint.results[h].best_epoch, joint.results[h].best_acc) == (epoch, pytest.approx(acc))
        assert [e["lr"] for e in joint.results[h].history] == pytest.approx(
            [cfg.lr * cfg.gamma ** ((ep - 1) // cfg.step_size) for ep in range(1, cfg.epochs + 1)])


def test_heads_differ_and_a_head_becomes_a_linear_probe():
    X, y = toy(seed=3)
    joint = train_linear_heads(X, y, X, y, GRID, seed=0)
    assert not torch.allclose(joint.weight[0], joint.weight[2])
    probs = predict_proba_heads(joint, X)
    for h in range(len(GRID)):
        probe = joint.probe(h)
        np.testing.assert_allclose(probe.predict_proba(X), probs[h], rtol=1e-5, atol=1e-6)
        assert probe.result.best_acc == pytest.approx((probs[h].argmax(1) == y).mean())


def test_without_val_each_head_keeps_its_last_epoch():
    X, y = toy(seed=4)
    joint = train_linear_heads(X, y, None, None, GRID[:2], seed=0)
    assert [r.best_epoch for r in joint.results] == [6, 6] and joint.results[0].best_acc is None


def test_heads_that_cannot_share_batches_are_refused():
    X, y = toy(seed=5)
    with pytest.raises(ProbeError, match="must share epochs, batch_size, class_weight"):
        train_linear_heads(X, y, None, None, [LinearConfig(batch_size=4), LinearConfig(batch_size=8)])
    assert shared_key(LinearConfig(lr=1.0)) == shared_key(LinearConfig(lr=2.0))
    with pytest.raises(ProbeError, match="linear.lr = -1"):
        train_linear_heads(X, y, None, None, [LinearConfig(lr=-1)])


def history_alone(X, y, cfg: LinearConfig, seed: int, num_classes: int):
    """The reference loop's final weights and per-epoch train loss / top-1 (from the logits each step used)."""
    ref = fit_reference(lambda: nn.Linear(X.shape[1], num_classes), X, y, None, None, cfg, seed, num_classes)
    return ref.final, ref.history


MIXED = [LinearConfig(epochs=5, batch_size=4, lr=lr, weight_decay=wd, momentum=m, step_size=s, gamma=g)
         for lr, wd, m, s, g in [(0.05, 0.0, 0.0, 2, 0.5), (0.01, 1e-2, 0.9, 1, 0.7), (0.2, 0.0, 0.5, 3, 0.1),
                                 (0.02, 1e-3, 0.0, 2, 0.9)]]


@pytest.mark.parametrize("window, gram_bytes, class_weight, dual", [
    (3, 0, "balanced", "off"), (4, 2 ** 30, "none", "off"), (1, 2 ** 30, "balanced", "off"), (64, 0, "none", "off"),
    (3, 2 ** 30, "balanced", "on"), (64, 2 ** 30, "none", "on")])
def test_windows_of_steps_train_the_reference_heads_exactly(monkeypatch, window, gram_bytes, class_weight, dual):
    """lazy_sgd's windows (3 or 4 steps into a 10-step epoch whose last batch has 2 rows, one step, or the
    whole epoch), with the Gram gathered from the train set's or per window, in primal or in dual
    coordinates, give each head the weights, train loss and top-1 of nn.Linear + torch.optim.SGD + StepLR
    trained alone."""
    from pipeline import lazy_sgd

    monkeypatch.setattr(lazy_sgd, "WINDOW_STEPS", window)
    monkeypatch.setattr(lazy_sgd, "GRAM_BYTES", gram_bytes)
    monkeypatch.setattr(lazy_sgd, "DUAL", dual)
    X, y = toy(n=38, seed=7)
    grid = [LinearConfig(**{**vars(c), "class_weight": class_weight}) for c in MIXED]
    joint = train_linear_heads(X, y, None, None, grid, num_classes=3, seed=2)
    for h, cfg in enumerate(grid):
        state, history = history_alone(X, y, cfg, seed=2, num_classes=3)
        torch.testing.assert_close(joint.weight[h], state["weight"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(joint.bias[h], state["bias"], rtol=1e-4, atol=1e-5)
        mine = [(e["train_loss"], e["train_acc"]) for e in joint.results[h].history]
        assert [loss for loss, _ in mine] == pytest.approx([loss for loss, _ in history], rel=1e-4)
        assert [acc for _, acc in mine] == pytest.approx([acc for _, acc in history], abs=1e-6)


@pytest.mark.parametrize("decays", [(0.0, 0.3), (0.0, 0.0)])
def test_dual_heads_without_momentum_train_the_reference_heads(monkeypatch, decays):
    """No head has momentum (the dual layer keeps no buf coefficients), with and without weight decay."""
    from pipeline import lazy_sgd

    monkeypatch.setattr(lazy_sgd, "DUAL", "on")
    monkeypatch.setattr(lazy_sgd, "WINDOW_STEPS", 3)
    X, y = toy(n=38, seed=8)
    grid = [LinearConfig(epochs=4, batch_size=4, lr=lr, weight_decay=wd, momentum=0.0, step_size=2, gamma=0.5)
            for lr, wd in zip((0.05, 0.1), decays)]
    joint = train_linear_heads(X, y, None, None, grid, num_classes=3, seed=3)
    for h, cfg in enumerate(grid):
        state, _ = history_alone(X, y, cfg, seed=3, num_classes=3)
        torch.testing.assert_close(joint.weight[h], state["weight"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(joint.bias[h], state["bias"], rtol=1e-4, atol=1e-5)


def test_sgd_tables_are_powers_of_the_update_matrix():
    from pipeline.lazy_sgd import sgd_tables

    lr, m, wd = 0.1, 0.9, 0.01
    A = np.array([[1 - lr * wd, -lr * m], [wd, m]])
    P, V = sgd_tables([lr], [m], [wd], 5)
    for n in range(5):
        np.testing.assert_allclose(P[n, :, 0], np.linalg.matrix_power(A, n).ravel())
        np.testing.assert_allclose(V[n, :, 0], np.linalg.matrix_power(A, n) @ [-lr, 1.0])


def test_shear_table_applies_the_powers_in_place_and_refuses_small_a():
    """W <- a W + b B, then B <- d B + l W (the new W) is A^n (W, B); a decay that makes A^n oscillate
    (a_n under 1/2) gets no table, so the dual advance keeps its two-buffer form."""
    from pipeline.lazy_sgd import sgd_tables, shear_table

    P, _ = sgd_tables([0.1, 0.01], [0.9, 0.5], [0.01, 0.0], 6)
    S = shear_table(P)
    w, b = np.random.default_rng(0).normal(size=(2, 2))
    for n in range(7):
        a, b_, a2, b2 = P[n]
        new_w = a * w + b_ * b
        np.testing.assert_allclose(S[n, 0] * b + S[n, 1] * new_w, a2 * w + b2 * b, rtol=1e-12)
    assert shear_table(sgd_tables([0.5], [0.9], [0.5], 8)[0]) is None


def test_dual_heads_whose_decay_oscillates_train_the_reference_heads(monkeypatch):
    """Strong weight decay with momentum (no shear table for that lr; StepLR then brings one) beside a
    mild head: the dual advance's two forms, one after the other, still give torch.optim's weights."""
    from pipeline import lazy_sgd

    monkeypatch.setattr(lazy_sgd, "DUAL", "on")
    monkeypatch.setattr(lazy_sgd, "WINDOW_STEPS", 4)
    X, y = toy(n=38, seed=9)
    grid = [LinearConfig(epochs=4, batch_size=4, lr=lr, weight_decay=wd, momentum=0.9, step_size=2, gamma=0.1)
            for lr, wd in ((0.3, 0.5), (0.01, 1e-3))]
    assert lazy_sgd.shear_table(lazy_sgd.sgd_tables([0.3, 0.01], [0.9] * 2, [0.5, 1e-3], 4)[0]) is None
    assert lazy_sgd.shear_table(lazy_sgd.sgd_tables([0.03, 0.001], [0.9] * 2, [0.5, 1e-3], 4)[0]) is not None
    joint = train_linear_heads(X, y, None, None, grid, num_classes=3, seed=4)
    for h, cfg in enumerate(grid):
        state, _ = history_alone(X, y, cfg, seed=4, num_classes=3)
        torch.testing.assert_close(joint.weight[h], state["weight"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(joint.bias[h], state["bias"], rtol=1e-4, atol=1e-5)


def test_dual_coordinates_engage_when_they_cost_less_and_fit(monkeypatch):
    """dual_pays weighs an epoch's multiply-adds (digits-sized: dual; many more rows than features: primal);
    use_dual refuses a Gram over GRAM_BYTES; a dual layer's coordinates materialise to its weights."""
    from pipeline import lazy_sgd
    from pipeline.lazy_sgd import LazyLayer, dual_pays

    assert dual_pays(1347, 450, 1281, 240, True, 25, True) and dual_pays(300, 100, 1281, 120, False, 25, False)
    assert not dual_pays(1347, 450, 1281, 10, True, 25, False)                # one head: the Grams cost more
    assert not dual_pays(300, 100, 1281, 5, False, 25, False)
    assert not dual_pays(20000, 5000, 1281, 240, True, 25, False)
    assert not dual_pays(3000, 0, 1281, 240, True, 1, False)
    monkeypatch.setattr(lazy_sgd, "DUAL", "off")
    assert not dual_pays(300, 100, 1281, 240, True, 25, True)
    monkeypatch.setattr(lazy_sgd, "DUAL", "on")
    x = torch.randn(40, 7)
    layer = LazyLayer(torch.randn(6, 7), [0.9] * 2, [1e-3] * 2, [3, 3])
    monkeypatch.setattr(lazy_sgd, "GRAM_BYTES", 40 * 40 * 4 - 1)
    assert not layer.use_dual(x, None, 5) and layer.dual is None
    monkeypatch.setattr(lazy_sgd, "GRAM_BYTES", 40 * 40 * 4)
    assert layer.use_dual(x, None, 5, x_eval=x[:9])
    layer.set_lr([0.1, 0.01], batch_size=4)
    order, windows = lazy_sgd.epoch_plan(40, 4, torch.Generator().manual_seed(0), layer.steps)
    for start, end, bounds in windows[:2]:
        layer.begin(x, order[start:end], None, bounds)
        layer.g.normal_()
        for k in range(len(bounds)):
            layer.step(k)
        layer.end()
    coords = layer.coordinates()
    torch.testing.assert_close(layer.materialise(coords), layer.weight)
    torch.testing.assert_close(layer.eval_outputs(x[:9], 2, 9), x[2:9] @ layer.weight.T, rtol=1e-5, atol=1e-5)


def test_interleaved_row_groups_take_turns():
    """The joint layer is class-major: row r of an interleaved layer is in group r % 2 here (its momentum,
    weight decay, lr and SGD tables); unequal groups cannot take turns."""
    from pipeline.lazy_sgd import LazyLayer

    layer = LazyLayer(torch.zeros(6, 3), [0.9, 0.0], [1e-3, 0.0], [3, 3], interleave=True)
    layer.set_lr([0.1, 0.2], batch_size=4)
    assert layer.lr.tensor.tolist() == pytest.approx([0.1, 0.2] * 3)
    assert layer.m.tensor.tolist() == pytest.approx([0.9, 0.0] * 3)
    assert layer.P[1][1].tolist() == pytest.approx([-0.09, 0.0] * 3)          # A's -lr m, row by row
    one_after_another = LazyLayer(torch.zeros(6, 3), [0.9, 0.0], [0.0, 0.0], [3, 3])
    assert one_after_another.m.tensor.tolist() == pytest.approx([0.9] * 3 + [0.0] * 3)
    with pytest.raises(ValueError, match="must be equal"):
        LazyLayer(torch.zeros(5, 3), [0.9, 0.0], [0.0, 0.0], [3, 2], interleave=True)


def test_training_flushes_subnormals_and_restores_the_thread_after(monkeypatch):
    """A confident head's softmax underflows into subnormal floats, which cost a microcode assist per op on x86
    (docs/heads.md): the trainers run with them flushed to zero and leave the thread's setting as they found it."""
    from pipeline import head, joint, lazy_mlp, probes, runtime

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")
    flushed = runtime.subnormals_flushed
    seen = []
    with runtime.flushed_subnormals():
        seen.append(flushed())
    assert seen == [True] and not flushed()
    epoch = joint._train_epoch
    monkeypatch.setattr(joint, "_train_epoch", lambda *a: (seen.append(flushed()), epoch(*a))[1])
    X, y = toy(n=24, seed=1)
    train_linear_heads(X * 50, y, None, None, [LinearConfig(epochs=2, batch_size=4, lr=0.3)], num_classes=3)
    assert seen == [True, True, True] and not flushed()         # on in both epochs, off again after
    for trainer in (train_linear_heads, lazy_mlp.train_mlps, head.fit_head, probes.fit_module):
        assert trainer.__wrapped__                               # each trainer runs inside it
    torch.set_flush_denormal(True)
    try:
        with runtime.flushed_subnormals():
            pass
        assert flushed()                                         # on before: still on after
    finally:
        torch.set_flush_denormal(False)
