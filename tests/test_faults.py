"""The fault suite of the writers (issue 23): what a user, a crash, a full disk or a second process does to files.

Each kind of write (artefact export, cache build, checkpoint) is killed with SIGKILL in the middle and run again,
and its output compared with an uninterrupted run's; a disk filled to its last megabyte (a small tmpfs when this
process may mount one, else a file size limit, RLIMIT_FSIZE, which fails writes with EFBIG the same way); two
writers at once; a user's folder as --out; file names that look like markup; ensembles that point outside
themselves. Killed writers run in processes forked from one server that imported torch once (multiprocessing's
forkserver), so each costs a fork, not an import.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pneumolab.cli import app
from pneumolab.errors import ArtefactError, OutputError
from pneumolab.inference.card import bundled_model_dir
from pneumolab.inference.export import export_artefact
from pneumolab.inference.loader import load_backend
from tests.conftest import synthetic_xray

_PRELOAD = ["pneumolab.inference.export", "pneumolab.data.cache", "pneumolab.runs"]


@pytest.fixture(scope="module")
def forked():
    """A multiprocessing context whose children fork from a server that imported pneumolab and torch once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".pneumolab-")) if folder.is_dir() else []


def _kill_mid_write(process, folder: Path, timeout: float = 60) -> None:
    """SIGKILL `process` once it has a temporary in `folder` (it is then in the middle of a write)."""
    deadline = time.monotonic() + timeout
    while not any(f".pneumolab-tmp-{process.pid}-" in name for name in _temporaries(folder)):
        assert process.is_alive() and time.monotonic() < deadline, "the writer never started a write"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL


def _same_artefact(a: Path, b: Path) -> bool:
    """Same tensors and metadata in each safetensors file (safetensors orders metadata keys at random), same card
    but for its creation time and the files' hashes."""
    from safetensors import safe_open

    for name in ("model.safetensors", "gate.safetensors"):
        with safe_open(a / name, "np") as x, safe_open(b / name, "np") as y:
            keys = sorted(x.keys())
            if x.metadata() != y.metadata() or keys != sorted(y.keys()):
                return False
            if not all(np.array_equal(x.get_tensor(k), y.get_tensor(k)) for k in keys):
                return False
    cards = [json.loads((f / "card.json").read_text()) for f in (a, b)]
    for card in cards:
        for key in ("created", "weights_sha256", "gate_sha256"):
            card.pop(key)
    return cards[0] == cards[1]


# --- writers killed mid-write ------------------------------------------------------------------------------------


def _export_forever(dest: str) -> None:
    while True:
        export_artefact(bundled_model_dir(), dest)


def test_export_killed_mid_write_leaves_a_whole_artefact_and_the_rerun_matches(forked, tmp_path):
    dest, reference = tmp_path / "out" / "artefact", tmp_path / "reference"
    export_artefact(bundled_model_dir(), dest)  # an earlier export the killed one replaces
    writer = forked.Process(target=_export_forever, args=(str(dest),))
    writer.start()
    _kill_mid_write(writer, dest.parent)
    assert _temporaries(dest.parent), "the killed writer left its temporary (removed by the next writer)"
    load_backend(dest)  # still a whole artefact: loads, its files match its card
    export_artefact(bundled_model_dir(), dest)
    export_artefact(bundled_model_dir(), reference)
    assert _temporaries(dest.parent) == [] and sorted(p.name for p in dest.parent.iterdir()) == ["artefact"]
    assert _same_artefact(dest, reference)


# --- a user's folder as --out, names that look like markup ---------------------------------------------------------


def test_export_and_gate_refuse_a_users_folder_and_keep_its_files(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's")
    runner = CliRunner()
    for args in (["export", "default", "--out", str(mine)], ["gate", "default", "--data", "x", "--out", str(mine)]):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, OutputError), result.output
        assert str(result.exception).startswith(f"{mine}: holds keep.txt") and "--force" in str(result.exception)
        assert [p.name for p in mine.iterdir()] == ["keep.txt"]
    # an artefact is replaced by the next export (the old copy stays until the new one is in place) ...
    artefact = export_artefact(bundled_model_dir(), tmp_path / "artefact")
    export_artefact(bundled_model_dir(), artefact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artefact", "mine"]
    # ... and --force replaces anything
    assert runner.invoke(app, ["export", "default", "--out", str(mine), "--force"]).exit_code == 0
    assert (mine / "card.json").is_file() and not (mine / "keep.txt").exists()


def test_predict_prints_a_file_name_that_looks_like_markup(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "a[").mkdir()
    Image.fromarray(synthetic_xray(np.random.default_rng(0), (96, 96))).save(tmp_path / "a[" / "b].jpeg")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["predict", "a[/b].jpeg"])
    assert result.exit_code == 0, result.output
    assert "a[/b].jpeg" in result.output


# --- ensembles: members inside the artefact, hashed -----------------------------------------------------------------


def _ensemble_artefact(folder: Path) -> Path:
    """A two-member ensemble artefact of the bundled model, written as `pneumolab export` writes one."""
    from pneumolab.evaluate.ensemble import EnsembleCombiner
    from pneumolab.inference.ensemble import EnsembleModel, export_ensemble

    member = load_backend(bundled_model_dir())
    combiner = EnsembleCombiner.from_saved({"method": "mean", "weights": [0.5, 0.5]})
    ensemble = EnsembleModel(
        members=[member, member],
        member_names=["a", "b"],
        member_sources=[bundled_model_dir()] * 2,
        combiner=combiner,
        source=bundled_model_dir(),
        threshold=0.5,
    )
    return export_ensemble(ensemble, folder, export_artefact)


def test_ensemble_members_stay_inside_and_match_their_recorded_hashes(tmp_path):
    ensemble = _ensemble_artefact(tmp_path / "ensemble")
    card_file = ensemble / "ensemble.json"
    card = json.loads(card_file.read_text())
    assert [m["folder"] for m in card["members"]] == ["0-a", "1-b"]
    assert all(len(m["card_sha256"]) == 64 for m in card["members"])
    assert load_backend(ensemble).backend == "ensemble"
    outside = export_artefact(bundled_model_dir(), tmp_path / "outside")
    (ensemble / "members" / "link").symlink_to(outside)
    for folder, words in (
        (str(outside), "is not a folder inside members/"),
        ("../../outside", "is not a folder inside members/"),
        ("link", "is not a folder inside members/"),
    ):
        bad = {**card, "members": [{**card["members"][0], "folder": folder}, card["members"][1]]}
        card_file.write_text(json.dumps(bad))
        with pytest.raises(ArtefactError, match=words):
            load_backend(ensemble)
    for change, words in (
        ({"card_sha256": None}, "has no card SHA-256"),
        ({"card_sha256": "0" * 64}, "does not match"),
    ):
        bad = {**card, "members": [{**card["members"][0], **change}, card["members"][1]]}
        card_file.write_text(json.dumps(bad))
        with pytest.raises(ArtefactError, match=words):
            load_backend(ensemble)


def test_a_card_without_its_sha256_is_refused(tmp_path):
    artefact = export_artefact(bundled_model_dir(), tmp_path / "artefact")
    card = json.loads((artefact / "card.json").read_text())
    for key in ("weights_sha256", "gate_sha256"):
        (artefact / "card.json").write_text(json.dumps({**card, key: None}))
        with pytest.raises(ArtefactError, match=f"its card records no SHA-256 \\({key}\\)"):
            load_backend(artefact)
    for name in ("default", "three-class"):  # the bundled cards carry theirs
        assert load_backend(bundled_model_dir(name)).backend == "pytorch"


def _cache_forever(data: str, root: str) -> None:
    from pneumolab.data.cache import prepare_cache

    while True:
        cache, _ = prepare_cache(data, size=256, cache_root=root, workers=1, progress=False)
        shutil.rmtree(cache.path)  # and build it again


def test_cache_build_killed_mid_write_is_cleaned_and_the_rerun_matches(forked, make_dataset, tmp_path):
    from pneumolab.data.cache import prepare_cache

    data, root = make_dataset(), tmp_path / "cache"
    writer = forked.Process(target=_cache_forever, args=(str(data), str(root)))
    writer.start()
    _kill_mid_write(writer, root)
    cache, _ = prepare_cache(data, size=256, cache_root=root, workers=1, progress=False)
    reference, built = prepare_cache(data, size=256, cache_root=tmp_path / "reference", workers=1, progress=False)
    assert built and [p.name for p in root.iterdir()] == [cache.path.name]  # the killed build's folder is gone
    assert np.array_equal(cache.images, reference.images) and cache.manifest.equals(reference.manifest)


def _checkpoint_forever(dest: str) -> None:
    import torch

    from pneumolab.runs import save_checkpoint

    state = {"model": {"w": torch.arange(1 << 22, dtype=torch.float32)}, "epoch": 0}
    while True:
        save_checkpoint(state, dest)
        state["epoch"] += 1


def test_checkpoint_killed_mid_write_leaves_the_last_whole_one(forked, tmp_path):
    import torch

    from pneumolab.runs import load_checkpoint, save_checkpoint

    dest = tmp_path / "run" / "checkpoints" / "last.pt"
    writer = forked.Process(target=_checkpoint_forever, args=(str(dest),))
    writer.start()
    _kill_mid_write(writer, dest.parent)
    epoch = load_checkpoint(dest)["epoch"] if dest.exists() else -1  # the last whole one (or none yet)
    state = {"model": {"w": torch.arange(1 << 22, dtype=torch.float32)}, "epoch": epoch + 1}
    save_checkpoint(state, dest)  # the resumed run writes its next one
    save_checkpoint(state, tmp_path / "reference.pt")
    assert [p.name for p in dest.parent.iterdir()] == ["last.pt"]
    again, reference = load_checkpoint(dest), load_checkpoint(tmp_path / "reference.pt")
    assert again["epoch"] == reference["epoch"] and torch.equal(again["model"]["w"], reference["model"]["w"])


# --- a disk full to its last megabyte ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """``(folder, how)``: a 32 MiB tmpfs mounted for the test (root only), else a plain folder whose writers get a
    1 MiB file size limit (RLIMIT_FSIZE: EFBIG where a full disk gives ENOSPC)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(disk)]
    mounted = os.geteuid() == 0 and shutil.which("mount") and subprocess.run(mount, capture_output=True).returncode == 0
    try:
        yield disk, "tmpfs" if mounted else "rlimit"
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(disk)], check=True)


def _write_on_a_full_disk(disk: str, how: str, what: str, source: str, result: str) -> None:
    """Fill `disk` to its last MiB (or limit file sizes to 1 MiB), then write `what`; the error goes to `result`."""
    import resource

    from pneumolab.errors import PneumolabError

    if how == "tmpfs":
        usage = shutil.disk_usage(disk)
        if usage.total > 64 << 20:  # never fill a real disk: only the test's own small tmpfs
            raise RuntimeError(f"{disk} is not the test's 32 MiB tmpfs ({usage.total:,} bytes)")
        free = usage.free
        if free > 1 << 20:
            with open(Path(disk) / f"filler-{what}", "wb") as filler:
                os.posix_fallocate(filler.fileno(), 0, free - (1 << 20))
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        if what == "export":
            export_artefact(bundled_model_dir(), Path(disk) / "artefact")
        else:
            from pneumolab.data.cache import prepare_cache

            prepare_cache(source, size=512, cache_root=Path(disk) / "cache", workers=1, progress=False)
    except PneumolabError as error:
        Path(result).write_text(str(error))


def test_a_full_disk_is_one_line_and_keeps_the_old_artefact(forked, small_disk, make_dataset, tmp_path):
    disk, how = small_disk
    old = export_artefact(bundled_model_dir(), disk / "artefact")  # 12 MB: the export replacing it has no room
    for what, where in (("export", disk / "artefact"), ("cache", disk / "cache")):
        result = tmp_path / f"{what}.txt"
        writer = forked.Process(target=_write_on_a_full_disk, args=(str(disk), how, what, str(make_dataset()), result))
        writer.start()
        writer.join()
        assert writer.exitcode == 0, f"{what} on a full disk ({how}): exit {writer.exitcode} (-7 is SIGBUS)"
        message = result.read_text()
        assert message.startswith(str(where)) and "\n" not in message, message
        assert any(words in message for words in ("no space left", "MiB free", "too large")), message
        assert _temporaries(disk) == [] and _temporaries(disk / "cache") == []
    assert load_backend(old).backend == "pytorch"  # the old artefact is whole


# --- writers at once -----------------------------------------------------------------------------------------------


def _export_twice(dest: str) -> None:
    for _ in range(2):
        export_artefact(bundled_model_dir(), dest)


def test_concurrent_exports_to_one_folder_both_succeed(forked, tmp_path):
    dest = tmp_path / "artefact"
    writers = [forked.Process(target=_export_twice, args=(str(dest),)) for _ in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    assert [w.exitcode for w in writers] == [0, 0]
    assert load_backend(dest).backend == "pytorch" and [p.name for p in tmp_path.iterdir()] == ["artefact"]


def _log(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(line + "\n")


def _grid_worker(out: str, log: str) -> None:
    """`run --study`'s shape: take grid points, then do what the plain command does (train what is not done)."""
    os.environ["PNEUMOLAB_POLL_SECONDS"] = "0.1"
    from pneumolab.sweep.study import open_storage, run_grid

    def work(point: dict) -> float:
        _log(log, f"train {point['model']} by {os.getpid()}")
        time.sleep(1.0)
        (Path(out) / f"{point['model']}.done").touch()
        return 0.0

    run_grid("grid", open_storage(None, out), [{"model": "a"}], work)
    if not (Path(out) / "a.done").exists():
        _log(log, f"train a by {os.getpid()} (plain command)")


def test_study_workers_never_train_a_point_twice(forked, tmp_path):
    log = tmp_path / "log.txt"
    first = forked.Process(target=_grid_worker, args=(str(tmp_path), str(log)))
    first.start()
    deadline = time.monotonic() + 60
    while not log.exists():  # the first worker is training the only point
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = forked.Process(target=_grid_worker, args=(str(tmp_path), str(log)))
    second.start()
    first.join()
    second.join()
    assert [first.exitcode, second.exitcode] == [0, 0]
    assert len(log.read_text().splitlines()) == 1, log.read_text()


def _hold_run_lock(run: str, held: str) -> None:
    from pneumolab.runs import RunDir

    with RunDir(run).lock():
        Path(held).touch()
        time.sleep(120)


def test_a_run_folder_is_trained_by_one_process_at_a_time(forked, tmp_path):
    from pneumolab.config import TrainConfig
    from pneumolab.errors import SettingError
    from pneumolab.runs import RunDir
    from pneumolab.train.api import train

    run, held = tmp_path / "run", tmp_path / "held"
    holder = forked.Process(target=_hold_run_lock, args=(str(run), str(held)))
    holder.start()
    deadline = time.monotonic() + 60
    while not held.exists():
        assert holder.is_alive() and time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(SettingError, match=f"{run}: another process is training this run \\(pid {holder.pid} "):
        train(TrainConfig(), run, progress=False)
    os.kill(holder.pid, signal.SIGKILL)  # a killed trainer's lock goes with it
    holder.join()
    with RunDir(run).lock():
        pass
