"""labkit.files: the one atomic writer and the one content hash."""
import hashlib

import numpy as np
import pytest

from labkit import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary_behind(tmp_path):
    path = files.write_text(tmp_path / "record.json", "old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(path, half_then_fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_the_temporary_name_keeps_the_suffix_a_saver_checks(tmp_path):
    seen = []
    files.write_atomic(tmp_path / "qat-0123.weights.h5", lambda tmp: seen.append(tmp.name)
                       or tmp.write_bytes(b"w"))
    assert seen[0].endswith("qat-0123.weights.h5") and seen[0] != "qat-0123.weights.h5"


def test_content_key_hashes_shape_and_bytes_of_arrays_and_scalars():
    x = np.arange(6, dtype=np.float32)
    old = hashlib.sha256(str(x.shape).encode() + x.tobytes()).hexdigest()[:10]
    assert files.content_key(x) == old   # the keys caches were written with before files.py
    assert files.content_key(x.reshape(2, 3)) != files.content_key(x)
    assert files.content_key(np.int32(3)) != files.content_key(np.int32(4))   # a step counter
    assert files.content_key(None) == files.content_key("None")
    with pytest.raises(TypeError, match="content_key hashes"):
        files.content_key(3.5)
