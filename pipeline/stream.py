"""Heads from caches bigger than memory: mini-batches streamed from the HDF5 cache in chunks.

When the train+val features of a cache, as float32, exceed `head.max_memory_gb`, the head and the
logistic baseline read them from disk instead of loading them whole. The unit of a read is one
HDF5 chunk (ROW_CHUNK rows): HDF5 reads and checksums (fletcher32) whole chunks, so that is what
any read costs anyway.

Rows are stored in ImageFolder order, so one chunk holds one or two classes. A training pass
therefore visits the chunks in a new seeded random order, fills a buffer from many of them and
yields its rows in random order: a buffer made of many random chunks is what makes the batches
look like i.i.d. draws. When the buffer holds fewer than MIX_CHUNKS chunks (a small budget, or a
small cache), batches of whole chunks would each see a class or two, so a fill takes a random
subset of the rows of MIX_CHUNKS chunks instead, reading each of those chunks once per fill: up to
MIX_CHUNKS / (chunks per buffer) times the I/O, for batches that mix classes as in memory.
Every row is yielded exactly once per pass, and the buffer is allocated once.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch

from pipeline import PipelineError
from pipeline import cache

GIB = 2 ** 30
MIB = 2 ** 20
MIX_CHUNKS = 16         # chunks a training buffer draws its rows from, at least
LABEL_BYTES = 16        # per buffered row: its int64 label and its int64 row number
# Shares of head.max_memory_gb. The rest is left to what streaming cannot avoid, measured on a
# 2 GiB cache of 400,000 rows: every row's label and path (~100 MiB, ~190 MiB while the file is
# verified), the batches, and the training loop's own allocations (~60 MiB).
TRAIN_SHARE = 3 / 8     # the training buffer
VAL_SHARE = 1 / 16      # the val buffer of the head (read in order; its batches are copies)


def budget_bytes(max_memory_gb: float) -> int:
    """head.max_memory_gb in bytes (GiB, 2^30 bytes)."""
    return int(max_memory_gb * GIB)


def float32_nbytes(shapes: dict[str, tuple[int, int]], splits=None) -> int:
    """Bytes the features of these splits take as float32: n_samples x feature_dim x 4.

    splits None: every split the cache has (train, val and a test split, which is loaded with them).
    """
    splits = [s for s in cache.ALL_SPLITS if s in shapes] if splits is None else splits
    return sum(shapes[s][0] * shapes[s][1] * 4 for s in splits)


def needs_streaming(shapes: dict[str, tuple[int, int]], max_memory_gb: float) -> bool:
    """True when train+val(+test), as float32, exceed the budget: stream from disk instead of loading."""
    return float32_nbytes(shapes) > budget_bytes(max_memory_gb)


def size_text(nbytes: int) -> str:
    """2.05 GiB, or 191.9 MiB below 1 GiB."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / MIB:.1f} MiB"


def stream_message(stage: str, nbytes: int, max_memory_gb: float, how: str) -> str:
    """The line a stage prints when it streams instead of loading the cache."""
    return (f"{stage}: cache is {size_text(nbytes)} of float32 features > head.max_memory_gb={max_memory_gb:g} "
            f"({size_text(budget_bytes(max_memory_gb))}): {how}")


def check_views_budget(train_views: int, max_memory_gb: float, shapes: dict[str, tuple[int, int]]) -> None:
    """The view bank is held in memory beside the clean features; refuse when both exceed the budget.

    train_views: extract.train_views; max_memory_gb: head.max_memory_gb.
    """
    k = train_views
    if not k:
        return
    clean, bank = float32_nbytes(shapes), k * float32_nbytes(shapes, ("train",))
    if clean + bank > budget_bytes(max_memory_gb):
        need = math.ceil((clean + bank) / GIB * 1000) / 1000
        raise PipelineError(
            f"head: extract.train_views={k} keeps the view bank in memory beside the features "
            f"({size_text(clean)} clean + {size_text(bank)} of views, as float32), more than "
            f"head.max_memory_gb={max_memory_gb:g}, and the view bank is not streamed: set "
            f"extract.train_views=0 to train from the clean features (streamed from disk when they exceed the "
            f"budget), or raise head.max_memory_gb to at least {need:g}")


class StreamBatches:
    """Mini-batches (x, y) streamed from one split of an open cache; re-iterable like engine.TensorBatches.

    shuffle=True: every pass visits the HDF5 chunks in a new random order (seeded: the same seed
    gives the same passes), fills the buffer from several chunks at a time and yields the buffered
    rows in random order, in full batches of batch_size (a batch may span two fills); every row
    exactly once per pass. shuffle=False: rows in file order, batches of at most batch_size.

    max_bytes bounds the memory this object holds: the float32 buffer with its labels and row numbers,
    plus one chunk of scratch when the buffer is filled from more chunks than it holds. The buffer is
    whole chunks, at least one, at most the split. Batches handed out are copies, not views of it.

    x : float32 tensor of shape (n, feature_dim); y : int64 tensor of shape (n,).
    """

    def __init__(self, split: cache.SplitReader, batch_size: int, max_bytes: int, shuffle: bool,
                 seed: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        n, chunk = split.n_rows, split.chunk_rows
        self.chunks = np.array([(s, min(s + chunk, n)) for s in range(0, n, chunk)], dtype=np.int64).reshape(-1, 2)
        chunk_bytes = chunk * (4 * split.feature_dim + LABEL_BYTES)
        held = max(1, max_bytes // chunk_bytes)                     # chunks the buffer can hold
        self.mix_chunks = min(len(self.chunks), MIX_CHUNKS) if shuffle else 1
        self.mixing = held < self.mix_chunks                        # fills draw rows from more chunks than fit
        if self.mixing:
            held = max(1, (max_bytes - chunk * 4 * split.feature_dim) // chunk_bytes)
        self.held_chunks = held
        self.rows = min(held * chunk, n)                            # buffer rows
        self._x = np.empty((self.rows, split.feature_dim), dtype=np.float32)
        self._y = np.empty(self.rows, dtype=np.int64)
        self._r = np.empty(self.rows, dtype=np.int64)
        self._scratch = np.empty((chunk, split.feature_dim), dtype=np.float32) if self.mixing else None
        self._xt, self._yt, self._rt = (torch.from_numpy(a) for a in (self._x, self._y, self._r))
        self._labels = torch.from_numpy(split.labels)
        self._rng = np.random.default_rng(seed)
        self.chunk_order: Optional[np.ndarray] = None               # the last pass's chunk order
        self.chunk_reads = 0                                        # chunks read by the last pass

    @property
    def nbytes(self) -> int:
        """Memory held by the buffer (and scratch), in bytes."""
        scratch = 0 if self._scratch is None else self._scratch.nbytes
        return self._x.nbytes + self._y.nbytes + self._r.nbytes + scratch

    def __len__(self) -> int:
        n = self.split.n_rows
        if self.shuffle or not n:
            return math.ceil(n / self.batch_size)
        full, rest = divmod(n, self.rows)
        return full * math.ceil(self.rows / self.batch_size) + math.ceil(rest / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _ in self.iter_rows():
            yield x, y

    def iter_rows(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One pass of (x, y, rows): rows (n,) int64 are the batch's row numbers in the split."""
        return self._shuffled() if self.shuffle else self._in_order()

    # ------------------------------------------------------------------------- reading
    def _in_order(self):
        n, bs = self.split.n_rows, self.batch_size
        self.chunk_reads = len(self.chunks)
        for start in range(0, n, max(self.rows, 1)):
            stop = min(start + self.rows, n)
            self.split.read_rows(start, stop, self._x)
            for b in range(0, stop - start, bs):
                e = min(b + bs, stop - start)
                yield (self._xt[b:e].clone(), self._labels[start + b:start + e],
                       torch.arange(start + b, start + e))

    def _fill_chunks(self, chunk_ids: np.ndarray) -> int:
        """Read whole chunks into the buffer, one after the other; returns the rows filled."""
        pos = 0
        for start, stop in self.chunks[chunk_ids]:
            self.split.read_rows(start, stop, self._x[pos:])
            self._y[pos:pos + stop - start] = self.split.labels[start:stop]
            self._r[pos:pos + stop - start] = np.arange(start, stop)
            pos += stop - start
        self.chunk_reads += len(chunk_ids)
        return pos

    def _fill_rows(self, chunk_ids: np.ndarray, rows: np.ndarray) -> int:
        """Read the chunks (in file order) and keep only the given rows of them; returns the rows filled."""
        pos = 0
        for start, stop in self.chunks[np.sort(chunk_ids)]:
            keep = rows[(rows >= start) & (rows < stop)]
            if not len(keep):
                continue
            block = self.split.read_rows(start, stop, self._scratch)
            self._x[pos:pos + len(keep)] = block[keep - start]
            self._y[pos:pos + len(keep)] = self.split.labels[keep]
            self._r[pos:pos + len(keep)] = keep
            pos += len(keep)
            self.chunk_reads += 1
        return pos

    def _fills(self) -> Iterator[int]:
        """Fill the buffer again and again for one shuffled pass; yields the rows filled each time."""
        order = self._rng.permutation(len(self.chunks))
        self.chunk_order, self.chunk_reads = order, 0
        if not len(order):
            return
        per_group = self.mix_chunks if self.mixing else self.held_chunks
        for group in np.array_split(order, math.ceil(len(order) / per_group)):
            if not self.mixing:
                yield self._fill_chunks(group)
                continue
            rows = np.concatenate([np.arange(*self.chunks[c]) for c in group])
            parts = math.ceil(len(rows) / self.rows)
            for part in np.array_split(self._rng.permutation(rows), parts):
                yield self._fill_rows(group, np.sort(part))

    def _shuffled(self):
        bs = self.batch_size
        carry = None  # rows left over from the previous fill: fewer than one batch
        for n in self._fills():
            perm = torch.from_numpy(self._rng.permutation(n))
            start = 0
            if carry is not None:
                start = min(bs - len(carry[0]), n)
                idx = perm[:start]
                carry = tuple(torch.cat((c, t[idx])) for c, t in zip(carry, (self._xt, self._yt, self._rt)))
                if len(carry[0]) < bs:
                    continue  # this fill was used up by the carried batch
                yield carry
                carry = None
            for b in range(start, n - bs + 1, bs):
                idx = perm[b:b + bs]
                yield self._xt[idx], self._yt[idx], self._rt[idx]
            rest = (n - start) % bs
            if rest:
                idx = perm[n - rest:]
                carry = (self._xt[idx], self._yt[idx], self._rt[idx])
        if carry is not None:
            yield carry
