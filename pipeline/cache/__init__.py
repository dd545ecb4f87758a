"""The HDF5 feature cache, by concern; the only package that imports h5py.

    key.py        format constants, CacheError, the cache key (`feature_config`, manifests, digests)
                  and the names of a cache's files (no h5py)
    h5.py         opening files, attributes, small files of named arrays (scan index, view bank)
    reader.py     verifying and reading a complete file: `open_cache` -> FeatureSet, `read_cache`
    stream.py     a verified file kept open, read a row range at a time: `open_features`
    freshness.py  why a cache cannot be used (the miss reasons extract prints)
    writer.py     the chunk store of unfinished work, the complete-file writer, assembly

What is cached, and under which name
------------------------------------
One complete cache file per dataset and *feature configuration*, named by both::

    <cache_dir>/<data folder name>-<8 hex of its real path>.<backbone>-<config_key[:16]>.h5

(older versions wrote `<backbone>-<config_key[:16]>.h5` for any data: such a file is still read as
features.file, and its rows are copied into the first cache of that configuration under the new name).

The config key is the SHA-256 of `feature_config()`: cache format version, backbone,
weights identity (the weights file's SHA-256 where there is a file), feature cut, every
preprocessing parameter, storage dtype and torch/torchvision major.minor. The rows inside are
the images: each row is (path relative to the data root, label, SHA-256 of the image's bytes).
The full key is SHA-256(config key, digest of classes + every row), stored in the attributes.

Layout of a complete file::

    /<split>/features   (n_samples, feature_dim) float32|float16, chunked, fletcher32 checksums
                        (<split>: train, val and, when the data has one, test)
    /<split>/labels     (n_samples,) int64, index into the 'classes' attribute
    /<split>/paths      (n_samples,) utf-8, relative to the data root
    /<split>/sha256     (n_samples,) the image file's SHA-256, hex
    /<split>/taps/<tap> (n_samples, D_tap) per extra tap of backbone.taps (stage-2, concat, cls, ...),
                        stored like features; only in caches whose taps are not the default [pool]
    attrs: format_version, key, config_key, manifest_digest, classes, backbone, preprocess,
           feature_dim, dtype, data_root, versions, environment, seed, split (how the rows were split:
           folders, or data.val_fraction's content-hash rule), created, complete (last); with extra
           taps also taps (pool first) and tap_dims ({tap: D_tap})

A file carries everything the heads, the reports and `predict` need besides its features: the
classes, every row's label and path, the backbone spec (name, weights identity, cut) and its
preprocessing; so heads train from the file alone (`open_cache`), with no image tree.

Every open checks the structure (dataset names, dtypes, shapes) before reading data, then the
key: the stored rows must hash to `manifest_digest` and (config key, manifest_digest) to `key`.
A file that fails any check is a miss, never reused.

Crash safety: complete files are written under a temporary name, marked complete last, fsynced
and renamed into place. Work in progress lives apart, in `<name>.partial/`: self-contained chunk
files (`chunk-<digest>.h5`: sha256 + features of up to `extract.chunk_size` images), each also
written to a temporary name and renamed, so `kill -9` loses at most the chunk being computed and
never leaves a file a reader could take as complete. Features depend only on an image's bytes,
so chunks and the previous complete file are content-addressed pools: a rerun (after a crash, or
after images were added, removed, renamed or relabelled) copies every row it can find there
bitwise and runs the backbone only on the rest. `<name>.lock` (fcntl.flock, released by the
kernel when its holder dies) keeps a second writer out.

Scale-out: chunk files never share a writer and are named by their content, so several processes
can later fill one `<name>.partial/` with disjoint chunks (one lock per shard) and any one of them
can assemble the complete file once every row is present.
"""
from pipeline.cache.freshness import explain_new_config, miss_reason
from pipeline.cache.key import (ALL_SPLITS, DEFAULT_SPLIT_RULE, FEATURE_DTYPES, FORMAT_VERSION, OPTIONAL_SPLITS,
                                ROW_CHUNK, SPLITS, CacheError, SplitManifest, build_manifest, cache_key, cache_path,
                                digest, extra_taps, feature_config, hash_file, legacy_cache_path, lock_path, manifest_digest,
                                partial_dir, tap_dataset, write_error)
from pipeline.cache.reader import (CachedSplit, FeatureCache, FeatureSet, feature_shapes, open_cache, read_attrs,
                                   read_cache, read_manifest, read_split, verify_cache)
from pipeline.cache.stream import FeatureReader, SplitReader, open_features
from pipeline.cache.writer import (ASSEMBLE_ROWS, CacheWriter, ChunkStore, RowSource, assemble_cache, check_features,
                                   discard, is_intact, iter_unique, previous_rows, remove_stale_files,
                                   rows_of_more_taps)
