"""The GGUF conversion cache is keyed by the file's bytes, not by where the file lies or when it was written."""

import os

from loramux.engine.loader import _gguf_cache_folder


def test_copies_of_one_gguf_share_a_conversion_and_other_bytes_do_not(tmp_path):
    first = tmp_path / "venv-a" / "model.gguf"
    second = tmp_path / "venv-b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    os.utime(second, ns=(1, 1))  # another install, another mtime
    cache = tmp_path / "cache"
    assert _gguf_cache_folder(first, cache) == _gguf_cache_folder(second, cache)
    assert _gguf_cache_folder(first, cache).parent == cache
    assert _gguf_cache_folder(first, cache).name.startswith("model-")

    changed = bytearray(second.read_bytes())
    changed[-1] ^= 1  # same size, one bit different
    second.write_bytes(bytes(changed))
    assert _gguf_cache_folder(first, cache) != _gguf_cache_folder(second, cache)
