from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from pneumolab.data.cache import DatasetCache, prepare_cache
from pneumolab.data.io import load_xray
from pneumolab.errors import ImageReadError


def test_prepare_decodes_once_and_is_a_noop_when_unchanged(make_dataset, tmp_path):
    root = make_dataset(per_class=20, size=(80, 60))  # 80 films: two chunks, decoded by a pool of two processes
    cache, built = prepare_cache(root, size=32, cache_root=tmp_path / "cache", workers=2, progress=False)
    assert built
    assert cache.images.shape == (80, 32, 32) and cache.images.dtype == np.uint8
    for i in (0, 7, 70, 79):
        expected = load_xray(root / cache.manifest["path"].iat[i], size=32)
        np.testing.assert_array_equal(cache.images[i], expected)

    again, built_again = prepare_cache(root, size=32, cache_root=tmp_path / "cache", progress=False)
    assert not built_again and again.path == cache.path

    other_size, built_other = prepare_cache(root, size=48, cache_root=tmp_path / "cache", progress=False)
    assert built_other and other_size.path != cache.path

    # a changed file -> a new cache
    Image.fromarray(np.zeros((80, 60), np.uint8)).save(root / "train" / "NORMAL" / "IM-0000-0001.jpeg")
    changed, built_changed = prepare_cache(root, size=32, cache_root=tmp_path / "cache", progress=False)
    assert built_changed and changed.path != cache.path
    reopened = DatasetCache.open(changed.path)
    assert reopened.size == 32 and len(reopened.manifest) == 80


def test_unreadable_files_fail_or_are_skipped(make_dataset, tmp_path):
    root = make_dataset(per_class=3)
    (root / "test" / "NORMAL" / "IM-0099-0001.jpeg").write_text("not an image")
    with pytest.raises(ImageReadError, match=r"IM-0099-0001\.jpeg"):
        prepare_cache(root, size=16, cache_root=tmp_path / "cache", workers=1, progress=False)
    assert not any((p / "meta.json").exists() for p in (tmp_path / "cache").iterdir())

    cache, _ = prepare_cache(root, size=16, cache_root=tmp_path / "cache", skip_unreadable=True, progress=False)
    assert len(cache.manifest) == 12 and cache.images.shape[0] == 12
    assert "IM-0099-0001.jpeg" not in " ".join(cache.manifest["path"])


def test_an_interrupted_prepare_leaves_no_valid_cache(make_dataset, tmp_path):
    root = make_dataset(per_class=60, size=(700, 700))
    cache_root = tmp_path / "cache"
    command = [sys.executable, "-m", "pneumolab.cli", "data", "prepare", str(root), "--size", "64"]
    command += ["--cache", str(cache_root), "--workers", "1", "--quiet"]
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 60
    while not (cache_root.exists() and any(cache_root.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "prepare finished before it could be interrupted"
    assert not [p for p in cache_root.iterdir() if (p / "meta.json").exists()]
    cache, built = prepare_cache(root, size=64, cache_root=cache_root, progress=False)
    assert built and len(cache.manifest) == 240
