"""Sweeps on Optuna: real studies in journal files, real worker processes, tiny models on generated images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from pneumolab.config import TrainConfig, apply_overrides
from pneumolab.errors import SettingError
from pneumolab.pipeline import load_pipeline_config
from pneumolab.sweep.search import PruningCallback, run_sweep
from pneumolab.sweep.space import SweepSpace, load_space
from pneumolab.sweep.study import open_storage
from pneumolab.train.api import train

CLI = [sys.executable, "-m", "pneumolab.cli"]
TINY_TRAIN = {"model": {"name": "resnet18", "weights": "none"}, "image_size": 64, "batch_size": 8, "epochs": 2,
              "threads": 1, "max_batches": 2}  # fmt: skip
SPACE = {
    "objective": "val_loss",
    "params": {
        "optim.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "model.head": {"type": "categorical", "choices": ["linear", "plan"]},
    },
}


def _files(tmp_path: Path, space: dict | None = None, models: int = 1) -> tuple[Path, Path]:
    config, space_file = tmp_path / "base.yaml", tmp_path / "space.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": {"cache_dir": str(tmp_path / "cache")},
                "evaluate": {"tta": None, "resamples": 200},
                "models": [{"name": f"r18-{i}", "train": TINY_TRAIN} for i in range(models)],
            }
        )
    )
    space_file.write_text(yaml.safe_dump(space or SPACE))
    return config, space_file


def _worker(config: Path, space: Path, out: Path, root: Path, trials: int, **env: str) -> subprocess.Popen:
    command = [*CLI, "sweep", "--study", "s", "--config", str(config), "--space", str(space), "--trials",
               str(trials), "--out", str(out), "--data", str(root), "--quiet"]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})  # fmt: skip


def _space(tmp_path: Path, space: dict) -> SweepSpace:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return load_space(path)


def _study(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=open_storage(None, out))


def test_two_workers_share_one_journal_and_finish_one_study(make_dataset, tmp_path):
    root = make_dataset(per_class=12)
    config, space = _files(tmp_path)
    out = tmp_path / "sweep"
    # the cache is made once beforehand, so the two workers do not both decode the dataset
    subprocess.run([*CLI, "data", "prepare", str(root), "--cache", str(tmp_path / "cache")], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    workers = [_worker(config, space, out, root, trials=4) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=280)
        assert worker.returncode == 0, err
    trials = _study(out).get_trials()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and len(trials) == 4  # no worker ran past the study's size
    assert len({t.user_attrs["worker"]["pid"] for t in trials}) == 2  # both workers took trials
    for trial in finished:  # each trial a normal run folder, its value the best epoch's validation log loss
        run = Path(trial.user_attrs["run"])
        assert (run / "checkpoints" / "best.pt").is_file() and (run / "config.yaml").is_file()
        if trial.state == TrialState.COMPLETE:
            history = [line.split(",") for line in (run / "history.csv").read_text().splitlines()]
            column = history[0].index("val_loss")
            assert trial.value == pytest.approx(min(float(row[column]) for row in history[1:]))

    # --show reads the study back from its storage alone: page, data and a best config `run` accepts
    shown = subprocess.run([*CLI, "sweep", "--study", "s", "--show", "--out", str(out), "--json"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert (out / "sweep-s" / "sweep.html").is_file() and (out / "sweep-s" / "images" / "history.png").is_file()
    best = load_pipeline_config(summary["best_config"])
    best_trial = summary["best"][0]
    assert best.models[0].train.optim.lr == pytest.approx(best_trial["params"]["optim.lr"])
    assert best.models[0].train.model.head == best_trial["params"]["model.head"]


def test_a_worker_killed_mid_trial_leaves_a_usable_study(make_dataset, tmp_path):
    root = make_dataset(per_class=12)
    config, space = _files(tmp_path)
    out = tmp_path / "sweep"
    slow = tmp_path / "slow.yaml"  # longer trials, so the kill lands inside one
    slow.write_text(config.read_text().replace("epochs: 2", "epochs: 10").replace("max_batches: 2", "max_batches: 4"))
    first = _worker(slow, space, out, root, trials=2)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if (out / "study.journal").is_file() and any(t.state == TrialState.RUNNING for t in _study(out).trials):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"no trial started: {first.stderr.read() if first.poll() is not None else 'still waiting'}")
    killed = next(t.number for t in _study(out).trials if t.state == TrialState.RUNNING)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    # a new worker (same host: the dead process is noticed at once) fails the orphan and finishes the study
    second = _worker(slow, space, out, root, trials=1)
    _, err = second.communicate(timeout=280)
    assert second.returncode == 0, err
    assert f"trial {killed} failed: its worker is gone" in err
    trials = _study(out).trials
    assert trials[killed].state == TrialState.FAIL
    assert [t.state for t in trials if t.number != killed] == [TrialState.COMPLETE]  # the failed one not counted


def test_pruning_stops_a_weak_trial_after_the_epoch_the_pruner_rejects(make_dataset, tmp_path):
    root = make_dataset(per_class=12)
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1e-9))  # every loss is too high
    trial = study.ask()
    settings = {k: v for k, v in TINY_TRAIN.items() if k != "model"} | {"epochs": 3}
    settings |= {"data.root": str(root), "data.cache_dir": str(tmp_path / "cache"), "model.weights": "none"}
    config = apply_overrides(TrainConfig(), {**settings, "model.name": "resnet18"})
    pruning = PruningCallback(trial, "val_loss")
    train(config, tmp_path / "run", progress=False, callbacks=[pruning])
    assert pruning.pruned and len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 2  # one epoch
    assert list(study.trials[0].intermediate_values) == [1]


def test_a_comparison_spread_over_two_workers_trains_each_model_once(make_dataset, tmp_path):
    root = make_dataset(per_class=12)
    config, _ = _files(tmp_path, models=2)
    out = tmp_path / "out"
    subprocess.run([*CLI, "data", "prepare", str(root), "--cache", str(tmp_path / "cache")], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    command = [*CLI, "run", "--config", str(config), "--data", str(root), "--out", str(out), "--study", "cmp",
               "--quiet"]  # fmt: skip
    workers = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=280)
        assert worker.returncode == 0, err
    trials = optuna.load_study(study_name="cmp", storage=open_storage(None, out)).trials
    done = sorted(t.user_attrs["grid_point"]["model"] for t in trials if t.state == TrialState.COMPLETE)
    assert done == ["r18-0", "r18-1"]
    for name in done:  # one training each: a second would have been refused or resumed, and logged twice
        assert len((out / name / "history.csv").read_text().splitlines()) == 3
    assert (out / "report" / "report.html").is_file()


def test_points_over_the_compute_budget_are_skipped_untrained_and_not_counted(make_dataset, tmp_path):
    root = make_dataset(per_class=12)
    config, _ = _files(tmp_path)
    # base: 2 epochs at 64 px; a budget of 0.5 leaves 1 epoch (0.5) and refuses 2 or 3 epochs (1.0, 1.5)
    space = _space(tmp_path, {"objective": "val_loss", "sampler": "random", "budget": 0.5,
                                       "params": {"epochs": {"type": "int", "low": 1, "high": 3}}})  # fmt: skip
    out = tmp_path / "sweep"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_sweep(load_pipeline_config(config), space, study_name="s", out=out, trials=2, data=root, progress=False)
    trials = _study(out).trials
    skipped = [t for t in trials if t.user_attrs.get("over_budget")]
    trained = [t for t in trials if not t.user_attrs.get("over_budget")]
    assert len(trained) == 2 and all(t.state == TrialState.COMPLETE for t in trained)  # the skipped do not count
    assert all(t.params["epochs"] == 1 and t.user_attrs["compute"] == 0.5 for t in trained)
    assert all(t.state == TrialState.PRUNED and t.params["epochs"] > 1 for t in skipped)
    assert all(t.constraints["compute"] > 0 for t in skipped) and all(t.constraints["compute"] <= 0 for t in trained)
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{t.number:04d}" for t in trained]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"params": {"optim.lrr": {"type": "float", "low": 0.1, "high": 0.2}}}, "did you mean optim.lr"),
        ({"params": {"optim.lr": {"type": "float", "low": 0.2, "high": 0.1}}}, "low (0.2) must be below high"),
        ({"params": {"optim.lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}}, "log range needs low > 0"),
        (
            {"params": {"augment.preset": {"type": "categorical", "choices": ["plan", "nope"]}}},
            "augment.preset = 'nope'",
        ),
        ({"params": {"data.val_fraction": {"type": "float", "low": 0.1, "high": 0.2}}}, "the study's, not a trial's"),
        ({"objective": "val_auc"}, "unknown objective 'val_auc'"),
        ({"prune_from": 0}, "prune_from: Input should be greater than or equal to 1"),
        ({"budget": 0.5}, "budget 0.5: no point of the space fits it (the cheapest needs 1.00"),
    ],
)
def test_a_bad_space_fails_at_once_with_one_line(tmp_path, change, message):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SPACE, **change}))
    with pytest.raises(SettingError, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
        load_space(space, TrainConfig())
    assert str(space) in str(caught.value) or "space" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_cli_refuses_a_bad_space_before_any_work(make_dataset, tmp_path):
    config, space = _files(tmp_path, space={**SPACE, "params": {"epochs": {"type": "int", "low": 0, "high": 3}}})
    out = tmp_path / "out"
    failed = subprocess.run([*CLI, "sweep", "--study", "s", "--config", str(config), "--space", str(space),
                             "--out", str(out), "--data", str(make_dataset(per_class=8))],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert failed.returncode == 2 and "params.epochs = 0" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1 and not (out / "study.journal").exists()


def test_a_study_resumes_after_an_upgrade_adds_a_setting_but_not_after_a_change(make_dataset, tmp_path):
    root = make_dataset(per_class=8)
    config, _ = _files(tmp_path)
    space, out = _space(tmp_path, {**SPACE, "sampler": "random"}), tmp_path / "sweep"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run_sweep(load_pipeline_config(config), space, study_name="s", out=out, trials=1, data=root, progress=False)
    # as an older pneumolab recorded it: without `prune_from` (added since) in the space, nor `tensorboard` in the base
    study = _study(out)
    old = json.loads(json.dumps(study.user_attrs["definition"]))
    del old["space"]["prune_from"], old["base"]["tensorboard"]
    study.set_user_attr("definition", old)
    run_sweep(load_pipeline_config(config), space, study_name="s", out=out, trials=2, data=root, progress=False)
    assert len(_study(out).get_trials(states=(TrialState.COMPLETE,))) == 2

    changed = _space(tmp_path, {**SPACE, "sampler": "random", "prune_from": 2})
    with pytest.raises(SettingError, match="study 's' was started with other settings"):
        run_sweep(load_pipeline_config(config), changed, study_name="s", out=out, trials=3, data=root, progress=False)


def test_a_grid_study_recorded_before_a_setting_existed_reads_as_today(tmp_path):
    from pneumolab.sweep.spread import _definition, _recorded_today

    today = _definition("cv", load_pipeline_config(_files(tmp_path)[0]), folds=5, design="random")
    old = json.loads(json.dumps(today))
    del old["config"]["evaluate"]["target_sensitivity"]  # recorded before the setting existed: at its default
    assert _recorded_today(old) == today
    old["config"]["evaluate"]["resamples"] = 300  # a setting changed since: a different study
    assert _recorded_today(old) != today

    # a study recorded before `choose_by` existed chose TTA on ROC-AUC: it is not today's default (log loss)
    del old["config"]["evaluate"]["choose_by"]
    old["config"]["evaluate"]["resamples"] = today["config"]["evaluate"]["resamples"]
    assert today["config"]["evaluate"]["choose_by"] == "log_loss" and _recorded_today(old) != today
    assert _recorded_today(old)["config"]["evaluate"] == {**today["config"]["evaluate"], "choose_by": "roc_auc"}
