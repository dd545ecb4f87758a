"""Exact SGD + momentum for a layer whose per-step gradient is low rank, applied a window of steps at a time.

A layer ``out = x W^T`` (bias folded in as a constant-1 input column, so one matrix W (R, D') carries
weight and bias; torch.optim applies weight_decay to the bias too, so folding is exact) gets, at step t,
the gradient ``g_t = G_t^T X_t``: G_t (B, R) the output gradients, X_t (B, D') the batch. torch.optim.SGD
(dampening 0, no Nesterov) with per-row lr, momentum m and weight decay wd is a linear recurrence on
the pair (W, buf):

    buf_t = m buf_{t-1} + g_t + wd W_{t-1};   W_t = W_{t-1} - lr buf_t
    => s_t = A s_{t-1} + e g_t,  A = [[1 - lr wd, -lr m], [wd, m]],  e = (-lr, 1)   (per row)

so over a window of K steps from (W0, B0), with lr constant inside it (StepLR changes lr only at epoch
ends, and a window never crosses one), ``W_k = a_k W0 + b_k B0 + sum_{j<=k} c_{k-j} G_j^T X_j``, where
(a_k, b_k) is the first row of A^k and c_n = (A^n e)_0 (tables built by iterating A forward).

LazyLayer never forms a full-size gradient per step. At the window start it projects W0 and B0 on the
window's rows (``Z = X_win W0^T``, ``ZB = X_win B0^T``, one GEMM each); each step reads its outputs from
Z, and adds its rank-B update to the projections of the window's later rows only, through the window's
Gram matrix X_win X_win^T: ``ZB <- m ZB + Gram[later, step] G + wd Z; Z <- Z - lr ZB``, the same
recurrence seen through X_win. At the window end W and buf are materialised with one GEMM each. The
full-size passes over W happen once per window instead of about ten per step; the result equals the
step-by-step update in real arithmetic (tests/test_joint.py, tests/test_probes.py check float tolerance
against torch.optim). After a window, Z holds exactly the outputs each step used (a row is not updated
after its own step), so train loss and accuracy are computed from it once per window.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import numpy as np
import torch

WINDOW_STEPS = 64                  # SGD steps per window (measured: docs/heads.md)
WINDOW_ROWS = 512                  # ... and at most this many rows (large batches: fewer steps per window)
GRAM_BYTES = 64 * 2 ** 20          # the train set's Gram matrix is computed once when it fits in this
DUAL = "auto"                      # dual coordinates: "auto" (when they cost less: dual_pays), "on", "off"


@contextlib.contextmanager
def small_ops(device: torch.device):
    """One intra-op thread on the CPU for a window's per-step ops (restored after): they are too small
    to share, and on a busy machine two threads waiting on each other made one head 6x slower (docs/heads.md).
    The window's GEMMs run outside, with torch's threads."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def window_steps(batch_size: int) -> int:
    """Steps per window for this batch size: WINDOW_STEPS, fewer when the window would exceed WINDOW_ROWS."""
    return max(1, min(WINDOW_STEPS, WINDOW_ROWS // max(batch_size, 1)))


def with_ones(x: torch.Tensor) -> torch.Tensor:
    """(n, D) -> (n, D + 1): the constant-1 column that carries the bias."""
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)


def packed(linear: torch.nn.Linear) -> torch.Tensor:
    """(out_features, in_features + 1): the layer's weight with its bias as the last column (with_ones' layout)."""
    return torch.cat([linear.weight, linear.bias[:, None]], 1).detach()


def gram_fits(n: int, x: torch.Tensor) -> bool:
    """Whether the Gram matrix of n rows of x's dtype fits in GRAM_BYTES."""
    return n * n * x.element_size() <= GRAM_BYTES


def full_gram(x_aug: torch.Tensor, epochs: int, batch_size: int) -> Optional[torch.Tensor]:
    """X X^T of the whole train set when it fits in GRAM_BYTES and costs less than a Gram per window; else None."""
    n = len(x_aug)
    if not gram_fits(n, x_aug) or epochs * window_steps(batch_size) * batch_size <= n:
        return None
    return x_aug @ x_aug.T


def dual_pays(n: int, n_eval: int, d: int, rows: int, momentum: bool, epochs: int, have_gram: bool) -> bool:
    """Whether dual coordinates cost fewer multiply-adds over the run than the primal form, for rows output
    rows: an epoch is rows (k n^2 + n_eval n) against rows (2 k n d + n_eval d) (k = 2 with momentum, 1
    without), plus once the Gram matrix (n^2 d unless already computed), the cross Gram (n_eval n d) and
    the start's projections (rows (n + n_eval) d). DUAL set to "on"/"off" decides instead."""
    if DUAL != "auto":
        return DUAL == "on"
    k = 2 if momentum else 1
    once = (0 if have_gram else n * n * d) + n_eval * n * d + rows * (n + n_eval) * d
    return epochs * rows * (k * n * n + n_eval * n) + once < epochs * rows * (2 * k * n * d + n_eval * d)


def window_gram(x_win: torch.Tensor, idx: torch.Tensor, gram: Optional[torch.Tensor]) -> torch.Tensor:
    """X_win X_win^T: gathered from the full Gram when there is one."""
    return x_win @ x_win.T if gram is None else gram[idx[:, None], idx]


def sgd_tables(lr: Sequence[float], momentum: Sequence[float], weight_decay: Sequence[float],
               steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(P (steps + 1, 4, G), V (steps, 2, G)) in float64 for G parameter groups: P[n] = A^n flattened
    row-major (a_n, b_n, a'_n, b'_n) and V[n] = A^n e, by iterating A forward (never inverting it)."""
    lr, m, wd = (np.asarray(v, dtype=np.float64) for v in (lr, momentum, weight_decay))
    a00, a01, a10, a11 = 1 - lr * wd, -lr * m, wd, m
    P = np.empty((steps + 1, 4, len(lr)))
    V = np.empty((steps, 2, len(lr)))
    P[0] = [np.ones_like(lr), np.zeros_like(lr), np.zeros_like(lr), np.ones_like(lr)]
    v = np.stack([-lr, np.ones_like(lr)])
    for n in range(steps):
        p = P[n]
        P[n + 1] = [a00 * p[0] + a01 * p[2], a00 * p[1] + a01 * p[3], a10 * p[0] + a11 * p[2], a10 * p[1] + a11 * p[3]]
        V[n] = v
        v = np.stack([a00 * v[0] + a01 * v[1], a10 * v[0] + a11 * v[1]])
    return P, V


def shear_table(P: np.ndarray) -> Optional[np.ndarray]:
    """(steps + 1, 2, G) in float64: (d_n, l_n) = (b'_n - a'_n b_n / a_n, a'_n / a_n) for sgd_tables' P, so
    that A^n applies in place as W <- a W + b B, then B <- d B + l W (the new W); None unless every a_n is
    at least 1/2 (no division by a small a_n; weight decay with momentum can make A^n oscillate)."""
    a, b, a2, b2 = P[:, 0], P[:, 1], P[:, 2], P[:, 3]
    if not (a >= 0.5).all():
        return None
    return np.stack([b2 - a2 * b / a, a2 / a], 1)


class _Rows:
    """Per-row hyper-parameters: python floats when every row agrees (scalar kernels), else (R,) tensors."""

    def __init__(self, values: Sequence[float], row_group: torch.Tensor, device: torch.device) -> None:
        self.uniform = len(set(values)) == 1
        self.scalar = float(values[0])
        self.tensor = torch.tensor(values, dtype=torch.float32)[row_group].to(device)
        self.any = any(v != 0 for v in values)


class LazyLayer:
    """W (R, D') trained by SGD a window at a time; rows come in parameter groups (an MLP's hidden units,
    a head's classes), each with its own lr, momentum and weight decay: groups[i] rows each, one group after
    another, or with interleave (equal groups) taking turns, row r in group r % len(groups)."""

    def __init__(self, weight: torch.Tensor, momentum: Sequence[float], weight_decay: Sequence[float],
                 groups: Sequence[int], interleave: bool = False) -> None:
        self._weight, self.device = weight, weight.device
        self.dual: Optional[_Dual] = None
        counts, index = list(groups), torch.arange(len(groups))
        if interleave and len(set(counts)) > 1:
            raise ValueError(f"interleaved row groups must be equal, got {counts}")
        self.row_group = (index.repeat(counts[0]) if interleave
                          else index.repeat_interleave(torch.tensor(counts, dtype=torch.long)))
        self.momentum, self.decay = list(map(float, momentum)), list(map(float, weight_decay))
        self.m = _Rows(self.momentum, self.row_group, self.device)
        self.wd = _Rows(self.decay, self.row_group, self.device)
        self.buf = torch.zeros_like(weight) if self.m.any else None      # momentum 0 everywhere: no buffer
        self._key: Optional[tuple] = None                               # the (lrs, steps) of P and V

    def set_lr(self, lrs: Sequence[float], batch_size: int) -> None:
        """The groups' lr for the coming epoch (python floats, as StepLR keeps them); its windows are of
        self.steps = window_steps(batch_size) steps at most (epoch_windows plans them so)."""
        self.lr = _Rows(list(map(float, lrs)), self.row_group, self.device)
        self.steps = window_steps(batch_size)
        key = (tuple(map(float, lrs)), self.steps)
        if key != self._key:                                            # StepLR changed lr: new tables
            self._key = key
            P, V = sgd_tables(key[0], self.momentum, self.decay, self.steps)
            S = shear_table(P) if self.buf is not None else None               # the dual advance's in-place form
            self.P, self.V, self.S = (None if t is None else torch.from_numpy(t).float()[..., self.row_group]
                                      .to(self.device) for t in (P, V, S))

    def use_dual(self, x: torch.Tensor, gram: Optional[torch.Tensor], epochs: int,
                 x_eval: Optional[torch.Tensor] = None) -> bool:
        """Switch to dual coordinates over the train rows x (n, D') when they cost less (dual_pays) and the
        Gram matrix fits in GRAM_BYTES; gram is x x^T when the caller has it. x_eval (rows scored every
        epoch, e.g. val) gets its cross Gram. Call it before the first window. Returns whether it is dual."""
        n, n_eval = len(x), 0 if x_eval is None else len(x_eval)
        momentum = self.buf is not None
        if (not gram_fits(n, x)
                or not dual_pays(n, n_eval, x.shape[1], len(self._weight), momentum, epochs, gram is not None)):
            return False
        self.dual = _Dual(x, x @ x.T if gram is None else gram, self._weight, momentum, self.wd.any, x_eval)
        return True

    def begin(self, x: torch.Tensor, idx: torch.Tensor, gram: Optional[torch.Tensor],
              bounds: list[tuple[int, int]]) -> None:
        """Start a window over the train rows x[idx] whose steps take the row ranges bounds (window order);
        gram is the train set's Gram matrix or None (then the window's is computed)."""
        self.idx, self.bounds = idx, bounds
        self.after = torch.tensor([len(bounds) - 1 - k for k, (s, e) in enumerate(bounds) for _ in range(e - s)],
                                  device=self.device)               # each row's number of later steps
        if self.dual is not None:
            self.gram, self.z, self.zb = self.dual.project(idx)
        else:
            self.x = x[idx]
            with small_ops(x.device):
                self.gram = window_gram(self.x, idx, gram)
            self.z = self.x @ self._weight.T                            # (n, R): each row's outputs, kept current
            self.zb = self.x @ self.buf.T if self.buf is not None else None
        self.g = torch.empty_like(self.z)                                # each step's output gradients

    def step(self, k: int) -> None:
        """Apply step k, whose output gradients the caller wrote into self.g[s:e], to the later rows' outputs."""
        s, e = self.bounds[k]
        if e == len(self.z):
            return
        z, g, gram = self.z[e:], self.g[s:e], self.gram[e:, s:e]
        if self.zb is None:                       # W <- (1 - lr wd) W - lr g
            if self.wd.any:
                z.mul_(1 - self.lr.scalar * self.wd.scalar if self.lr.uniform and self.wd.uniform
                       else 1 - self.lr.tensor * self.wd.tensor)
            if self.lr.uniform:
                z.addmm_(gram, g, alpha=-self.lr.scalar)
            else:
                z.addcmul_(gram @ g, self.lr.tensor, value=-1)
            return
        zb = self.zb[e:]
        if self.m.uniform:
            zb.addmm_(gram, g, beta=self.m.scalar)
        else:
            zb.mul_(self.m.tensor).addmm_(gram, g)
        if self.wd.any:
            zb.add_(z, alpha=self.wd.scalar) if self.wd.uniform else zb.addcmul_(z, self.wd.tensor)
        z.add_(zb, alpha=-self.lr.scalar) if self.lr.uniform else z.addcmul_(zb, self.lr.tensor, value=-1)

    def end(self) -> None:
        """Apply the window's steps to W and buf: one GEMM each (in dual coordinates, to the coefficients)."""
        p = self.P[len(self.bounds)]                                       # (4, R)
        coef = self.V.index_select(0, self.after)                          # (n, 2, R)
        if self.dual is not None:
            self.dual.advance(p, self.idx, coef, self.g, None if self.S is None else self.S[len(self.bounds)])
        else:
            w0, b0 = self._weight, self.buf
            new_w = p[0, :, None] * w0 if b0 is None else p[0, :, None] * w0 + p[1, :, None] * b0
            new_w.addmm_((coef[:, 0] * self.g).T, self.x)
            if b0 is not None:
                new_b = (p[2, :, None] * w0).add_(p[3, :, None] * b0).addmm_((coef[:, 1] * self.g).T, self.x)
                self.buf = new_b
            self._weight = new_w
        self.x = self.gram = self.z = self.zb = self.g = None

    @property
    def weight(self) -> torch.Tensor:
        """W (R, D'): materialised from the dual coordinates when dual (kept until the next window ends)."""
        return self._weight if self.dual is None else self.dual.weight()

    def coordinates(self) -> torch.Tensor:
        """A copy of the rows' current coordinates (R, K): W itself, or (alpha, C_W^T) when dual; a row's
        coordinates are all materialise needs, so a best epoch can be kept row by row without forming W."""
        return self._weight.clone() if self.dual is None else self.dual.coordinates()

    def materialise(self, coords: torch.Tensor) -> torch.Tensor:
        """W (R, D') of coordinates() taken (row by row) at any point of this layer's training."""
        return coords if self.dual is None else self.dual.materialise(coords)

    def eval_outputs(self, x_eval: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """x_eval[start:end] W^T (end - start, R); x_eval is the one given to use_dual."""
        if self.dual is None:
            return x_eval[start:end] @ self._weight.T
        return self.dual.eval_outputs(start, end)


class _Dual:
    """W and buf in dual coordinates over the train rows X (n, D'): W = alpha W0 + C_W^T X and buf =
    gamma W0 + C_B^T X, alpha and gamma per row (R,), C = [C_W | C_B] (n, 2R) ([C_W] without momentum).
    Every gradient is G^T X_win, so a window's update only scales C and adds to its rows, and a window's
    projections are Gram[win] C: 2 n^2 R multiply-adds an epoch (n^2 R without momentum) instead of the
    primal's 4 n D' R (2 n D' R), and val outputs are its cross Gram times C_W. The scaling (A^K) is applied
    to C in place when shear_table allows it, else through a spare buffer."""

    def __init__(self, x: torch.Tensor, gram: torch.Tensor, w0: torch.Tensor, momentum: bool, decay: bool,
                 x_eval: Optional[torch.Tensor]) -> None:
        self.x, self.gram, self.w0, self.momentum, self.decay = x, gram, w0, momentum, decay
        self.rows = len(w0)
        self.xw0 = x @ w0.T                                                  # (n, R)
        self.c = torch.zeros(len(x), self.rows * (2 if momentum else 1), dtype=w0.dtype, device=w0.device)
        self.spare: Optional[torch.Tensor] = None                            # advance's buffer when it cannot shear
        self.alpha = torch.ones(self.rows, dtype=w0.dtype, device=w0.device)
        self.gamma = torch.zeros_like(self.alpha)
        self.k_eval = x_eval @ x.T if x_eval is not None else None            # (n_eval, n)
        self.ew0 = x_eval @ w0.T if x_eval is not None else None
        self._w: Optional[torch.Tensor] = None

    def project(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(the window's Gram, its rows' outputs X_win W^T, and X_win buf^T or None)."""
        k = self.gram.index_select(0, idx)                                   # (m, n)
        out, base = k @ self.c, self.xw0.index_select(0, idx)
        with small_ops(idx.device):
            z = torch.addcmul(out[:, :self.rows], base, self.alpha)
            zb = torch.addcmul(out[:, self.rows:], base, self.gamma) if self.momentum else None
            return k.index_select(1, idx), z, zb

    def advance(self, p: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, g: torch.Tensor,
                shear: Optional[torch.Tensor] = None) -> None:
        """(W, buf) <- A^K (W, buf) + the window's rank-m updates, A^K = p (4, R), through the coefficients;
        shear (2, R) is shear_table's (d, l) for K, or None."""
        with small_ops(idx.device):              # this thread: see runtime.flushed_subnormals
            if self.momentum:
                self._scale(p, shear)
                self.alpha, self.gamma = p[0] * self.alpha + p[1] * self.gamma, p[2] * self.alpha + p[3] * self.gamma
            elif self.decay:                                                 # weight decay without momentum
                self.c.mul_(p[0])
                self.alpha = self.alpha * p[0]
            update = (coef * g[:, None]).view(len(g), -1) if self.momentum else coef[:, 0] * g   # [C_W | C_B] rows
            self.c.index_add_(0, idx, update)
        self._w = None

    def _scale(self, p: torch.Tensor, shear: Optional[torch.Tensor]) -> None:
        """[C_W | C_B] <- A^K per row: in place with shear, else in two passes into the spare buffer."""
        r = self.rows
        if shear is not None:                    # C_W <- a C_W + b C_B, then C_B <- d C_B + l C_W (the new C_W)
            c_w, c_b = self.c[:, :r], self.c[:, r:]
            c_w.mul_(p[0]).addcmul_(c_b, p[1])
            c_b.mul_(shear[0]).addcmul_(c_w, shear[1])
            return
        if self.spare is None:
            self.spare = torch.empty_like(self.c)
        c, new = self.c.view(-1, 2, r), self.spare.view(-1, 2, r)            # [C_W | C_B] as (n, 2, R)
        torch.mul(c[:, :1], p[0::2], out=new).addcmul_(c[:, 1:], p[1::2])   # (C_W a + C_B b, C_W a' + C_B b')
        self.c, self.spare = self.spare, self.c

    def weight(self) -> torch.Tensor:
        if self._w is None:
            self._w = torch.addmm(self.alpha[:, None] * self.w0, self.c[:, :self.rows].T, self.x)
        return self._w

    def coordinates(self) -> torch.Tensor:
        return torch.cat([self.alpha[:, None], self.c[:, :self.rows].T], 1)

    def materialise(self, coords: torch.Tensor) -> torch.Tensor:
        return torch.addmm(coords[:, :1] * self.w0, coords[:, 1:], self.x)

    def eval_outputs(self, start: int, end: int) -> torch.Tensor:
        return torch.addcmul(self.k_eval[start:end] @ self.c[:, :self.rows], self.ew0[start:end], self.alpha)


def epoch_plan(n: int, batch_size: int, generator: torch.Generator, steps: int):
    """The epoch's batch order and its windows: (order (n,), [(row start, row end, step bounds within the window)]).

    The permutation is drawn exactly as probes.shuffled_batches draws it, so the batches are the same."""
    from pipeline.probes import shuffled_batches

    batches = list(shuffled_batches(n, batch_size, generator))
    order = torch.cat(batches) if batches else torch.zeros(0, dtype=torch.long)
    windows, start = [], 0
    for w in range(0, len(batches), steps):
        sizes = [len(b) for b in batches[w:w + steps]]
        edges = np.cumsum([0] + sizes).tolist()
        windows.append((start, start + edges[-1], list(zip(edges[:-1], edges[1:]))))
        start += edges[-1]
    return order, windows


def batch_scale(order_labels: torch.Tensor, windows,
                class_weight: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's share of its batch's mean loss, w_i / sum of w over the batch (w = 1 without
    class_weight); that share times the batch's size: the row's weight in the epoch's summed train loss)."""
    w = (torch.ones(len(order_labels), device=order_labels.device) if class_weight is None
         else class_weight[order_labels])
    sizes = [e - s for _, _, bounds in windows for s, e in bounds]
    batch_of_row = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    batch_of_row = batch_of_row.to(w.device)
    sums = torch.zeros(len(sizes), device=w.device).index_add_(0, batch_of_row, w)
    scale = w / sums[batch_of_row]
    return scale, scale * torch.tensor(sizes, dtype=w.dtype, device=w.device)[batch_of_row]


def epoch_windows(layer: "LazyLayer", x: torch.Tensor, labels: torch.Tensor, batch_size: int,
                  generator: torch.Generator, class_weight: Optional[torch.Tensor], gram: Optional[torch.Tensor]):
    """One shuffled epoch, window by window: begins each window on layer (its Gram gathered on one thread,
    the projections with torch's threads), yields (the window's labels (n,), each row's loss scale (n, 1),
    each row's share of the summed train loss (n,)) for the caller to run the window's steps, then ends it."""
    order, windows = epoch_plan(len(x), batch_size, generator, layer.steps)
    order = order.to(x.device, non_blocking=True)
    order_labels = labels[order]
    scale, loss_share = batch_scale(order_labels, windows, class_weight)
    for start, end, bounds in windows:
        layer.begin(x, order[start:end], gram, bounds)
        yield order_labels[start:end], scale[start:end, None], loss_share[start:end]
        layer.end()
