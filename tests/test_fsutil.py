from __future__ import annotations

import os
import stat

import pytest

from pneumolab.fsutil import atomic_dir, atomic_path, write_json_atomic


def test_atomic_path_publishes_only_on_success(tmp_path):
    dest = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert not dest.exists() and list(tmp_path.iterdir()) == []
    with atomic_path(dest) as tmp:
        tmp.write_text("whole")
    assert dest.read_text() == "whole"


def test_atomic_entries_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        file_mode = stat.S_IMODE(write_json_atomic(tmp_path / "a.json", {"x": 1}).stat().st_mode)
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inner").write_text("x")
        dir_mode = stat.S_IMODE((tmp_path / "folder").stat().st_mode)
    finally:
        os.umask(mask)
    assert file_mode == 0o644 and dir_mode == 0o755


def test_atomic_dir_can_keep_a_folder_another_process_finished(tmp_path):
    dest = tmp_path / "cache"
    with atomic_dir(dest, keep_existing=True) as tmp:
        (tmp / "a").write_text("mine")
        dest.mkdir()  # another process renamed its finished copy into place meanwhile
        (dest / "a").write_text("theirs")
    assert (dest / "a").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
