"""Files that are read back later: written whole or not at all, and named by their content.

`write_atomic` is the one way labkit writes such a file; `sha256_of` and `content_key` are
its one file checksum and its one content hash (of bytes, text and arrays).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np


def write_atomic(path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` with a temporary path beside `path`, then rename it to `path`.

    A reader sees the old file or the new one, never half of one, even after a crash (a file is
    flushed to disk before the rename). The temporary name ends with `path`'s own name, so a
    writer that checks the suffix (".keras", ".weights.h5") accepts it.
    If `write` fails, the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        if tmp.is_file():   # on disk before the rename, so a crash cannot leave an empty file
            with open(tmp, "rb+") as written:
                os.fsync(written.fileno())
        elif tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)   # a directory (a SavedModel) is replaced whole
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return path


def write_text(path, text: str) -> Path:
    """`text` into `path`, atomically."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json(path, record, *, default=str) -> Path:
    """`record` as indented JSON into `path`, atomically (`default` turns other values to JSON)."""
    return write_text(path, json.dumps(record, indent=1, default=default))


def sha256_of(path) -> str:
    """The SHA-256 of a file's bytes, in hex: the data's, a bundle's, a loaded model's."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_key(*parts, digits: int = 10) -> str:
    """`digits` hex digits of SHA-256 over `parts`: bytes, str or NumPy arrays (shape and bytes).

    Two arrays with the same bytes but other shapes get other keys. None is hashed as "None",
    so an optional input can be passed as it is.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, (np.ndarray, np.generic)):   # a variable's value may be a scalar
            digest.update(str(part.shape).encode())
            digest.update(np.ascontiguousarray(part).tobytes())
        elif isinstance(part, (bytes, bytearray, memoryview)):
            digest.update(part)
        elif isinstance(part, str):
            digest.update(part.encode())
        elif part is None:
            digest.update(b"None")
        else:
            raise TypeError(f"content_key hashes bytes, str or NumPy arrays, "
                            f"got {type(part).__name__}")
    return digest.hexdigest()[:digits]
