from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from pneumolab import fsutil
from pneumolab.errors import OutputError
from pneumolab.fsutil import FolderKind, atomic_dir, atomic_path, write_json_atomic


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


# --- hardening (issue 23): foreign folders, the swap, stale temporaries, concurrent writers, full disks -------------

ARTEFACT = FolderKind("model artefact", marker="card.json", contents=("card.json", "model.safetensors"))


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _artefact(folder, text: str) -> None:
    (folder / "card.json").write_text(text)
    (folder / "model.safetensors").write_text(text)


def test_a_foreign_folder_is_refused_and_kept(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "keep.txt").write_text("the user's")
    with pytest.raises(OutputError, match=r"mine: .*keep\.txt.*--force"), atomic_dir(dest, kind=ARTEFACT) as tmp:
        _artefact(tmp, "new")
    assert (dest / "keep.txt").read_text() == "the user's" and [p.name for p in tmp_path.iterdir()] == ["mine"]
    # a folder holding the kind's marker and a user's file is not the kind's either
    _artefact(dest, "old")
    with pytest.raises(OutputError, match=r"keep\.txt"), atomic_dir(dest, kind=ARTEFACT) as tmp:
        _artefact(tmp, "new")
    with atomic_dir(dest, kind=ARTEFACT, force=True) as tmp:
        _artefact(tmp, "new")
    assert sorted(p.name for p in dest.iterdir()) == ["card.json", "model.safetensors"]


def test_the_same_kind_and_empty_folders_are_replaced(tmp_path):
    dest = tmp_path / "art"
    dest.mkdir()
    with atomic_dir(dest, kind=ARTEFACT) as tmp:  # an empty folder
        _artefact(tmp, "one")
    with atomic_dir(dest, kind=ARTEFACT) as tmp:  # the same kind
        _artefact(tmp, "two")
    assert (dest / "card.json").read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["art"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match=r"file: .*not a folder"), atomic_dir(tmp_path / "file", kind=ARTEFACT):
        pass


def test_stale_temporaries_of_dead_writers_are_removed_and_a_half_swap_restored(tmp_path):
    dead, host = _dead_pid(), fsutil._HOST
    stale_dir = tmp_path / f".pneumolab-tmp-{dead}-{host}-abcd1234.cache.tmp"
    stale_dir.mkdir()
    (stale_dir / "images.npy").write_bytes(b"x" * 100)
    stale_file = tmp_path / f".pneumolab-tmp-{dead}-{host}-abcd1235.last.pt.tmp"
    stale_file.write_bytes(b"half")
    alive = tmp_path / f".pneumolab-tmp-{os.getppid()}-{host}-abcd1236.other.tmp"  # a live writer's
    alive.mkdir()
    # a writer killed between "old aside" and "new in": the old copy comes back under its name
    aside = tmp_path / f".pneumolab-old-{dead}-{host}-abcd1237.art.tmp"
    aside.mkdir()
    _artefact(aside, "old")
    write_json_atomic(tmp_path / "x.json", {})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([alive.name, "art", "x.json"])
    assert (tmp_path / "art" / "card.json").read_text() == "old"


def test_writes_are_flushed_to_disk_before_the_rename(tmp_path):
    """strace shows an fsync of the file and of its folder before each rename (skipped without strace)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed (apt-get install -y strace)")
    script = (
        "from pneumolab.fsutil import atomic_dir, write_text_atomic\n"
        f"write_text_atomic({str(tmp_path / 'a.txt')!r}, 'x')\n"
        f"with atomic_dir({str(tmp_path / 'd')!r}) as t:\n    (t / 'f').write_text('y')\n"
    )
    trace = subprocess.run(
        ["strace", "-f", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2", sys.executable, "-c", script],
        capture_output=True, text=True, check=True,
    ).stderr.splitlines()  # fmt: skip
    wanted = [line for line in trace if ("(" in line and "pneumolab-" in line) or "fsync" in line]
    calls = [line.split("(")[0].split()[-1] for line in wanted]
    renames = [i for i, c in enumerate(calls) if c.startswith("rename")]
    assert len(renames) >= 2
    for i in renames:
        assert calls[i - 1] == "fsync"  # the folder (or file) synced just before its rename


def _write_many(dest: str, tag: str, n: int) -> None:
    kind = FolderKind("model artefact", marker="card.json", contents=("card.json", "model.safetensors"))
    for _ in range(n):
        with atomic_dir(dest, kind=kind) as tmp:
            _artefact(tmp, tag)


def test_concurrent_writers_never_fail_and_leave_one_whole_copy(tmp_path):
    dest = str(tmp_path / "art")
    with ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_write_many, dest, tag, 15) for tag in "abc"]:
            future.result()
    card, weights = (Path(dest) / "card.json").read_text(), (Path(dest) / "model.safetensors").read_text()
    assert card == weights and card in "abc"
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_a_full_disk_is_one_line(tmp_path):
    """EFBIG from a file size limit (RLIMIT_FSIZE) stands for a full disk: one OutputError naming the file."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
        "from pneumolab.errors import OutputError\n"
        "from pneumolab.fsutil import write_text_atomic\n"
        "try:\n"
        f"    write_text_atomic({str(tmp_path / 'big.txt')!r}, 'x' * (1 << 20))\n"
        "except OutputError as error:\n"
        "    print(error)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.count("\n") == 1 and "big.txt" in out and "too large" in out.lower()
    assert list(tmp_path.iterdir()) == []
