"""The GGUF conversion cache is keyed by the file's bytes and the converting transformers version, not by where
the file lies or when it was written."""

import os

import transformers

from loramux.engine.loader import _gguf_cache_folder


def test_copies_of_one_gguf_share_a_conversion_and_other_bytes_do_not(tmp_path, monkeypatch):
    first = tmp_path / "venv-a" / "model.gguf"
    second = tmp_path / "venv-b" / "model.gguf"
    for path in (first, second):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * (1 << 15))  # 8 MiB: read in more than one chunk
    os.utime(second, ns=(1, 1))  # another install, another mtime
    cache = tmp_path / "cache"
    assert _gguf_cache_folder(first, cache) == _gguf_cache_folder(second, cache)
    assert _gguf_cache_folder(first, cache).parent == cache
    assert _gguf_cache_folder(first, cache).name.startswith("model-")

    changed = bytearray(second.read_bytes())
    changed[-1] ^= 1  # same size, one bit different, in the last chunk
    second.write_bytes(bytes(changed))
    assert _gguf_cache_folder(first, cache) != _gguf_cache_folder(second, cache)

    before = _gguf_cache_folder(first, cache)
    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".other")
    assert _gguf_cache_folder(first, cache) != before  # another converter, another conversion
