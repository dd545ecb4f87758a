"""Streaming mini-batches from the HDF5 cache: every row once, shuffled chunks, bounded memory."""
import tracemalloc

import numpy as np
import pytest
import torch

from pipeline import cache as fc
from pipeline import stream
from pipeline.stream import StreamBatches
from tests.conftest import flip_feature_byte, write_feature_cache

DIM = 6
CHUNK_BYTES = fc.ROW_CHUNK * (4 * DIM + stream.LABEL_BYTES)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """2,000 class-sorted train rows (8 chunks, 4 classes) whose features are their own row number."""
    path = tmp_path_factory.mktemp("stream") / "c.h5"
    n = 2000
    x = np.repeat(np.arange(n, dtype=np.float32)[:, None], DIM, 1)
    y = np.arange(n) * 4 // n  # ImageFolder order: sorted by class
    write_feature_cache(path, {"train": (x, y), "val": (x[:300] + 0.5, y[:300])}, ["a", "b", "c", "d"])
    with fc.open_features(path) as r:
        yield r


def one_pass(batches: StreamBatches) -> tuple[torch.Tensor, list[int], list[torch.Tensor]]:
    """(row numbers in the order yielded, batch sizes, labels per batch); checks x and y match the rows."""
    rows, sizes, labels = [], [], []
    for x, y, r in batches.iter_rows():
        assert x.dtype == torch.float32 and x.shape == (len(r), DIM)
        assert torch.equal(x[:, 0].long(), r)                         # the features of those rows
        assert torch.equal(y, torch.from_numpy(batches.split.labels)[r])  # and their labels
        rows.append(r)
        sizes.append(len(r))
        labels.append(y)
    return torch.cat(rows), sizes, labels


@pytest.mark.parametrize("chunks, batch_size", [(1, 7), (3, 64), (9, 3), (1000, 100)])
def test_every_row_exactly_once_per_pass_in_full_batches(reader, chunks, batch_size):
    batches = StreamBatches(reader.train, batch_size, chunks * CHUNK_BYTES + 5000, shuffle=True, seed=0)
    assert batches.mixing == (chunks < 8)
    for _ in range(2):
        rows, sizes, _ = one_pass(batches)
        assert sorted(rows.tolist()) == list(range(2000))
        assert sizes[:-1] == [batch_size] * (len(sizes) - 1) and 0 < sizes[-1] <= batch_size
        assert len(batches) == len(sizes)


def test_chunk_order_changes_every_pass_and_is_reproducible_for_a_seed(reader):
    a = StreamBatches(reader.train, 50, 2 * CHUNK_BYTES, shuffle=True, seed=3)
    b = StreamBatches(reader.train, 50, 2 * CHUNK_BYTES, shuffle=True, seed=3)
    first_a, order_a1 = one_pass(a)[0], a.chunk_order.copy()
    second_a, order_a2 = one_pass(a)[0], a.chunk_order.copy()
    assert sorted(order_a1.tolist()) == list(range(8)) and not np.array_equal(order_a1, order_a2)
    assert not torch.equal(first_a, second_a)
    assert torch.equal(one_pass(b)[0], first_a) and torch.equal(one_pass(b)[0], second_a)  # same seed, same passes
    other = StreamBatches(reader.train, 50, 2 * CHUNK_BYTES, shuffle=True, seed=4)
    assert not torch.equal(one_pass(other)[0], first_a)


def test_whole_chunk_fills_visit_chunks_in_the_shuffled_order(reader):
    batches = StreamBatches(reader.train, 256, 1000 * CHUNK_BYTES, shuffle=True, seed=0)
    stream_mix, stream.MIX_CHUNKS = stream.MIX_CHUNKS, 1  # a one-chunk buffer that fills chunk by chunk
    try:
        one_chunk = StreamBatches(reader.train, 256, CHUNK_BYTES, shuffle=True, seed=0)
    finally:
        stream.MIX_CHUNKS = stream_mix
    rows, _, _ = one_pass(one_chunk)
    chunks_seen = [int(r) // fc.ROW_CHUNK for r in rows[::256]]
    assert chunks_seen == one_chunk.chunk_order.tolist()  # each buffer is the next chunk of the shuffled order
    assert one_chunk.chunk_reads == 8 and not one_chunk.mixing
    one_pass(batches)
    assert batches.chunk_reads == 8 and batches.rows == 2000  # the whole split in one buffer, each chunk read once


def test_small_buffers_still_mix_classes(reader):
    """Rows are class-sorted: a one-chunk buffer alone would give batches of one class."""
    mixed = StreamBatches(reader.train, 32, 2 * CHUNK_BYTES, shuffle=True, seed=0)
    _, _, labels = one_pass(mixed)
    classes_per_batch = np.mean([len(torch.unique(y)) for y in labels])
    assert mixed.mixing and classes_per_batch > 3.5  # 4 classes; whole-chunk fills would give about 1.2
    assert mixed.rows == fc.ROW_CHUNK  # one chunk and one chunk of scratch fit the budget
    assert mixed.chunk_reads == 8 * 8  # 8 one-chunk fills, each reading from all 8 chunks


def test_eval_mode_yields_rows_in_file_order(reader):
    batches = StreamBatches(reader.val, 64, CHUNK_BYTES, shuffle=False)
    for _ in range(2):
        rows, sizes, _ = one_pass(batches)
        assert rows.tolist() == list(range(300))
    assert len(batches) == len(sizes) == 5 and sizes[-1] == 44  # 256 rows buffered: 4 batches, then 44 rows
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(x[:, 0], torch.arange(300, dtype=torch.float32) + 0.5)


@pytest.mark.parametrize("chunks", [2, 5, 40])
def test_memory_is_bounded_by_the_budget_and_allocated_once(tmp_path, chunks):
    dim = 512  # wide rows, so that a buffer outweighs the per-pass index arrays
    x = np.random.default_rng(0).normal(size=(2000, dim)).astype(np.float32)
    path = tmp_path / "wide.h5"
    write_feature_cache(path, {"train": (x, np.arange(2000) * 4 // 2000), "val": (x[:2], np.zeros(2, int))},
                        ["a", "b", "c", "d"])
    budget = chunks * fc.ROW_CHUNK * (4 * dim + stream.LABEL_BYTES)
    with fc.open_features(path) as r:
        batches = StreamBatches(r.train, 16, budget, shuffle=True, seed=0)
        assert batches.nbytes <= budget and batches.rows >= fc.ROW_CHUNK
        assert batches.rows == 2000 or batches.rows % fc.ROW_CHUNK == 0  # whole chunks, at most the split
        buffer = batches._x
        tracemalloc.start()
        try:
            for _ in range(2):
                for _ in batches:
                    pass
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            r.train.read_rows(0, 2000, np.empty((2000, dim), dtype=np.float32))
            _, whole = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert batches._x is buffer       # reused, not reallocated per pass
    assert whole > x.nbytes           # numpy's allocations are traced: loading the split would show
    assert peak < 0.25 * budget       # during the passes: index arrays only, no second buffer


def test_a_failed_checksum_while_streaming_is_a_cache_error(tmp_path):
    x = np.ones((600, DIM), dtype=np.float32)
    path = tmp_path / "c.h5"
    write_feature_cache(path, {"train": (x, np.zeros(600, int)), "val": (x[:3], np.zeros(3, int))}, ["a"])
    flip_feature_byte(path, "train", chunk=2)
    with fc.open_features(path) as r:
        with pytest.raises(fc.CacheError, match="cannot read rows 512..599"):
            for _ in StreamBatches(r.train, 8, 10 * CHUNK_BYTES, shuffle=True):
                pass


def test_a_float16_cache_streams_as_float32(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(300, DIM)) * 50).astype(np.float32)
    path = tmp_path / "h.h5"
    write_feature_cache(path, {"train": (x, np.zeros(300, int)), "val": (x[:5], np.zeros(5, int))}, ["a"],
                        dtype="float16")
    with fc.open_features(path) as r:
        got = torch.cat([b for b, _ in StreamBatches(r.train, 32, CHUNK_BYTES, shuffle=False)])
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.from_numpy(x.astype(np.float16).astype(np.float32)))


def test_streaming_kicks_in_above_the_budget_in_gib():
    shapes = {"train": (1000, 1280), "val": (200, 1280)}  # 1200 * 1280 * 4 bytes = 5.86 MiB
    assert stream.float32_nbytes(shapes) == 1200 * 1280 * 4
    assert stream.needs_streaming(shapes, 5.8 / 1024) and not stream.needs_streaming(shapes, 5.9 / 1024)
    assert stream.budget_bytes(0.5) == 2 ** 29
