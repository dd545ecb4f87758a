"""Reading an image file's bytes safely: only a regular file, and at most MAX_IMAGE_BYTES of it.

Used by the scan, the data sets of extraction and finetuning, predict and the reports (through
pipeline.data, which re-exports these names).
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

# An image file larger than this is refused before it is read (Pillow's pixel limit bounds decoding,
# not the bytes read first): 512 MiB is far above any photo, and bounds a run's memory per image.
MAX_IMAGE_BYTES = 512 * 2 ** 20


class ImageFileError(OSError):
    """A path that must not be read as an image: not a regular file, or too large."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def read_image_bytes(path: str | Path, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes of a regular file of at most max_bytes; ImageFileError for anything else.

    Opened non-blocking and checked with fstat before reading: a fifo (which would block forever),
    /dev/zero (which never ends), a socket or a folder is refused, never read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise ImageFileError(e.errno, e.strerror) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageFileError(errno.EINVAL, "not a regular file (a fifo, device, socket or folder)")
        if st.st_size > max_bytes:
            raise ImageFileError(errno.EFBIG, f"{st.st_size / 2 ** 20:.0f} MiB, more than an image file may "
                                 f"be ({max_bytes // 2 ** 20} MiB)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # it grew since fstat
            raise ImageFileError(errno.EFBIG, f"more than {max_bytes // 2 ** 20} MiB")
        return data
    finally:
        os.close(fd)
