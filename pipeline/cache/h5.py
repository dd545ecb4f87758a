"""The package's door to h5py: open a file, read its attributes, write or read a small file of named arrays.

Modules outside `pipeline/cache/` that keep their own small HDF5 files (the scan index, the view
bank) describe them here as plain arrays and attributes, so h5py is imported nowhere else.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Optional

import h5py
import numpy as np

from pipeline.cache.key import H5_ERRORS, CacheError, damaged
from pipeline.fsutil import atomic_path, atomic_write_bytes

JSON_ATTRS = ("classes", "backbone", "backbone_config", "preprocess", "versions", "environment", "split", "taps",
              "tap_dims")
STRINGS = "utf-8"   # dataset option {"dtype": STRINGS}: variable-length UTF-8 strings
USERBLOCK = 512     # bytes before the HDF5 data of a checksummed file: a magic and the SHA-256 of the rest


class ChecksumError(CacheError):
    """A checksummed file whose bytes do not match the SHA-256 in its user block (damaged or older)."""


def _sealed(image: bytes, magic: bytes) -> bytes:
    """image (made with userblock_size=USERBLOCK) with magic + the SHA-256 of the rest in its user block."""
    data = bytearray(image)
    data[:USERBLOCK] = (magic + hashlib.sha256(data[USERBLOCK:]).hexdigest().encode()).ljust(USERBLOCK, b"\0")
    return bytes(data)


def _unsealed(path: Path, magic: bytes) -> io.BytesIO:
    """The file's bytes, checked against the SHA-256 in its user block before HDF5 parses any of them
    (a damaged file can crash the HDF5 library, not only raise); ChecksumError when they do not match."""
    raw = Path(path).read_bytes()
    head, body = raw[:USERBLOCK], raw[USERBLOCK:]
    recorded = head[len(magic):len(magic) + 64]
    if not head.startswith(magic) or recorded != hashlib.sha256(body).hexdigest().encode():
        raise ChecksumError(f"'{path}' failed its checksum (damaged or older)")
    return io.BytesIO(raw)


def open_h5(path: Path) -> h5py.File:
    """An HDF5 file open for reading; CacheError naming it when it cannot be opened."""
    try:
        return h5py.File(path, "r")
    except H5_ERRORS as e:
        raise damaged(path, e) from None


def attrs_of(f: h5py.File) -> dict:
    """The file's attributes as Python values; JSON-encoded ones decoded (a bad one is left as text)."""
    out = {}
    for k, v in f.attrs.items():
        out[k] = v.item() if isinstance(v, np.generic) else v
    for k in JSON_ATTRS:
        if isinstance(out.get(k), str):
            try:
                out[k] = json.loads(out[k])
            except ValueError:
                pass  # reported by the reader's attribute check
    return out


def _fill(f: h5py.File, arrays: dict[str, Any], attrs: dict, options: dict[str, dict]) -> None:
    for name, data in arrays.items():
        opts = dict(options.get(name, {}))
        if opts.get("dtype") == STRINGS:
            opts["dtype"] = h5py.string_dtype("utf-8")
        f.create_dataset(name, data=data, **opts)
    for name, value in attrs.items():
        f.attrs[name] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value


def write_arrays(path: Path, arrays: dict[str, Any], attrs: dict, options: Optional[dict[str, dict]] = None,
                 in_memory: bool = True, checksum: Optional[bytes] = None) -> Path:
    """Write named datasets and attributes as one HDF5 file, atomically (temporary name, then rename).

    in_memory: build the file in memory and write it with plain file I/O, so a full disk is an
    ordinary OSError rather than a half-closed HDF5 file; False for large arrays (written in place
    under the temporary name). options: per dataset, create_dataset keywords ({"dtype": STRINGS}).
    checksum: a magic (in memory only); the user block then holds it and the SHA-256 of the rest,
    which read_arrays(checksum=) verifies before parsing.
    """
    options = options or {}
    if not in_memory:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                _fill(f, arrays, attrs, options)
        return path
    image = io.BytesIO()
    with h5py.File(image, "w", **({"userblock_size": USERBLOCK} if checksum else {})) as f:
        _fill(f, arrays, attrs, options)
    atomic_write_bytes(path, _sealed(image.getvalue(), checksum) if checksum else image.getvalue())
    return path


def read_arrays(path: Path, names: tuple[str, ...],
                accept: Callable[[dict, dict[str, tuple[tuple[int, ...], np.dtype]]], bool],
                checksum: Optional[bytes] = None) -> Optional[dict]:
    """{name: array} of an HDF5 file, or None when it is missing, unreadable, damaged or not accepted.

    accept(attrs, {name: (shape, dtype)}) is asked before any array is read. Strings come back as bytes.
    checksum: the magic write_arrays sealed the file with; a mismatch raises ChecksumError.
    """
    if not Path(path).is_file():
        return None
    try:
        source = _unsealed(path, checksum) if checksum else path
    except OSError:
        return None
    try:
        with h5py.File(source, "r") as f:
            found = {n: f.get(n) for n in names}
            if not all(isinstance(ds, h5py.Dataset) for ds in found.values()):
                return None
            if not accept(attrs_of(f), {n: (ds.shape, ds.dtype) for n, ds in found.items()}):
                return None
            return {n: ds[()] for n, ds in found.items()}
    except H5_ERRORS:  # unreadable, or a checksum failed
        return None
