"""Optuna studies shared by workers: the storage is the only thing they share, so there is no scheduler here.

A worker is one process running `run_worker`: the same command started on N machines (or N times on one) with the
same storage joins one study. Two kinds of study:

- a search (`pneumolab sweep`): the sampler proposes each trial's settings; the study ends when it holds `trials`
  finished (complete or pruned) trials, not counting points skipped as over the compute budget;
- a grid (``pneumolab cv`` / ``pneumolab run`` with ``--storage``): every point (a fold, a model of a comparison)
  is enqueued once, and workers take the waiting points until none is waiting or running: a worker with nothing
  to take waits for the running points (one may fail and come back), so the plain command that follows finds
  every run finished and trains none of them again. Enqueued trials are popped by one worker each (Optuna's
  storage does that atomically), and a run folder is locked while it trains (`pneumolab.runs.RunDir.lock`), so no
  two workers train the same run folder.

Storage: a journal file (Optuna's `JournalStorage`, for one machine or a shared file system; SQLite is not safe
for concurrent writers), or an RDB URL (``postgresql://...``) for a cluster. A worker killed mid-trial leaves its
trial RUNNING in the storage; Optuna's own heartbeat covers RDB storages only, so each trial here records its worker
(host, pid) and a heartbeat, and every worker fails, before it asks for a trial, the running trials whose process is
gone from its host or whose heartbeat is older than the grace period. A failed grid point is enqueued again (its
run folder resumes from ``last.pt``); a failed search trial stays failed and the others go on.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, Trial, TrialState

from pneumolab.errors import SettingError
from pneumolab.progress import stderr_console

__all__ = [
    "GRID_ATTR",
    "JOURNAL_FILE",
    "MACHINE_LOCAL",
    "OVER_BUDGET",
    "fail_stale_trials",
    "load_study",
    "open_storage",
    "open_study",
    "run_grid",
    "run_worker",
    "trial_summary",
]

JOURNAL_FILE = "study.journal"
GRID_ATTR = "grid_point"  # a grid trial's fixed point, as a user attribute
OVER_BUDGET = "over_budget"  # a search trial skipped untrained: its point exceeds the space's compute budget
WORKER_ATTR = "worker"
HEARTBEAT_ATTR = "heartbeat"
HEARTBEAT_SECONDS = float(os.environ.get("PNEUMOLAB_HEARTBEAT_SECONDS", "30"))
GRACE_SECONDS = float(os.environ.get("PNEUMOLAB_GRACE_SECONDS", "600"))  # a trial silent this long is failed
POLL_SECONDS = float(os.environ.get("PNEUMOLAB_POLL_SECONDS", "2"))  # a grid worker with nothing to take looks again
_RDB_SCHEMES = ("postgresql", "mysql", "sqlite", "mariadb", "oracle", "mssql")

optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is ours to print


def open_storage(storage: str | os.PathLike[str] | None, out: str | os.PathLike[str]) -> BaseStorage:
    """An RDB URL, a journal file path, or (None) the journal file ``out/study.journal``."""
    text = str(storage) if storage is not None else str(Path(out) / JOURNAL_FILE)
    if text.split(":", 1)[0].split("+", 1)[0] in _RDB_SCHEMES and "://" in text:
        return RDBStorage(text)
    path = Path(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    # an open(2)-based lock: works on NFS and other shared file systems, where symlink locks may not
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


# The data settings each machine sets for itself (where it mounts the data, where it keeps the cache): the workers
# of one study need not agree on these.
MACHINE_LOCAL: set[str] = {"root", "cache_dir"}


def open_study(
    name: str,
    storage: BaseStorage,
    *,
    maximize: bool = False,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    definition: dict[str, Any] | None = None,
    read_recorded: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> optuna.Study:
    """Create the study or join it. `definition` (what the study searches: base config, space) is recorded by the
    first worker; a worker that brings a different one is refused, so one study never mixes two searches.
    `read_recorded` brings a recorded definition to today's form (settings added since, at their defaults) first;
    one it cannot read is a different one."""
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize" if maximize else "minimize",
        sampler=sampler,
        pruner=pruner,
        load_if_exists=True,
    )
    if definition is not None:
        recorded = study.user_attrs.get("definition")
        if recorded is None:
            study.set_user_attr("definition", definition)
        elif _read(recorded, read_recorded) != definition:
            raise SettingError(
                f"study {name!r} was started with other settings (config, space or folds); give this one "
                "another --study name"
            )
    return study


def _read(recorded: dict[str, Any], read_recorded: Callable[[dict[str, Any]], dict[str, Any]] | None) -> Any:
    try:
        return read_recorded(recorded) if read_recorded else recorded
    except (KeyError, TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        return None


def load_study(name: str, storage: BaseStorage) -> optuna.Study:
    """An existing study (one line naming it when the storage has no such study)."""
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise SettingError(f"no study {name!r} in this storage (it holds: {', '.join(known) or 'none'})") from None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def fail_stale_trials(study: optuna.Study, *, grace_seconds: float = GRACE_SECONDS) -> list[int]:
    """Fail the study's running trials whose worker died (module doc); re-enqueue failed grid points. Returns the
    numbers of the trials failed."""
    host, now, failed = socket.gethostname(), time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR)
        beat = trial.user_attrs.get(HEARTBEAT_ATTR, trial.datetime_start.timestamp() if trial.datetime_start else now)
        gone_here = bool(worker) and worker["host"] == host and _process_gone(int(worker["pid"]))
        if not gone_here and now - beat <= grace_seconds:
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # another worker failed it first (or it just finished)
            continue
        failed.append(trial.number)
        point = trial.user_attrs.get(GRID_ATTR)
        if point is not None:
            study.enqueue_trial(point, user_attrs={GRID_ATTR: point, "retry_of": trial.number})
        stderr_console.print(f"[bold]study[/bold] trial {trial.number} failed: its worker is gone", highlight=False)
    return failed


@contextlib.contextmanager
def _heartbeat(trial: Trial) -> Iterator[None]:
    """Record this worker on the trial and refresh its heartbeat until the trial ends."""
    trial.set_user_attr(WORKER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})
    trial.set_user_attr(HEARTBEAT_ATTR, time.time())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(Exception):  # a storage hiccup must not kill the training
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())

    thread = threading.Thread(target=beat, name="pneumolab-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _count(study: optuna.Study, *states: TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=states))


def _running_points(study: optuna.Study) -> int:
    """Grid points other workers are running now (trials asked without a point are ended at once, not counted)."""
    return sum(GRID_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def _counted(study: optuna.Study) -> int:
    """Trials that count towards a search's size: finished or running, not skipped as over the compute budget."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(not t.user_attrs.get(OVER_BUDGET) for t in study.get_trials(deepcopy=False, states=states))


def run_worker(
    study: optuna.Study,
    objective: Callable[[Trial], float],
    *,
    trials: int | None,
    grid: bool = False,
) -> int:
    """Take trials from `study` until it is done; return how many this worker finished.

    Done: for a search, `trials` finished (complete or pruned) trials, counting those other workers are running and
    not those skipped as over budget (two workers counting at the same instant may each start one more: at most one
    extra trial per extra worker);
    for a grid, no point waiting or running (a worker with nothing to take waits for the others' points, any of
    which may fail and be enqueued again). A trial that raises a pneumolab error is marked failed and the worker
    goes on; any other error (a bug, an interrupt) fails the trial and stops the worker.
    """
    finished = 0
    said_waiting = False
    while True:
        fail_stale_trials(study)
        if grid and not _count(study, TrialState.WAITING):
            running = _running_points(study)
            if not running:
                return finished
            if not said_waiting:
                stderr_console.print(f"[bold]study[/bold] waiting for {running} running point(s)", highlight=False)
                said_waiting = True
            time.sleep(POLL_SECONDS)
            continue
        if not grid and trials is not None and _counted(study) >= trials:
            return finished
        trial = study.ask()
        if grid and GRID_ATTR not in trial.user_attrs:  # another worker took the last point meanwhile
            study.tell(trial, state=TrialState.FAIL)
            continue  # and wait for it
        started = time.perf_counter()
        try:
            with _heartbeat(trial):
                value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            _said(trial, "pruned", started)
        except SettingError as error:
            study.tell(trial, state=TrialState.FAIL)
            _said(trial, f"failed: {error}", started)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, value)
            _said(trial, f"value {value:.5g}", started)
        finished += 1


def _said(trial: Trial, outcome: str, started: float) -> None:
    minutes = (time.perf_counter() - started) / 60
    stderr_console.print(f"[bold]study[/bold] trial {trial.number}: {outcome} ({minutes:.1f} min)", highlight=False)


def run_grid(
    name: str,
    storage: BaseStorage,
    points: list[dict[str, Any]],
    work: Callable[[dict[str, Any]], float],
    *,
    definition: dict[str, Any] | None = None,
    read_recorded: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> int:
    """Spread `points` over the workers of study `name`: each is enqueued once (by whichever worker comes first;
    later ones skip what exists) and done by the worker that takes it (`work(point)` returns its value)."""
    study = open_study(name, storage, definition=definition, read_recorded=read_recorded)
    for point in points:
        study.enqueue_trial(point, user_attrs={GRID_ATTR: point}, skip_if_exists=True)

    def objective(trial: Trial) -> float:
        point = trial.user_attrs[GRID_ATTR]
        states = (TrialState.RUNNING, TrialState.COMPLETE)
        earlier = [t.number for t in study.get_trials(deepcopy=False, states=states)
                   if t.user_attrs.get(GRID_ATTR) == point and t.number < trial.number]  # fmt: skip
        if earlier:  # two workers enqueued the grid at the same instant: the earlier trial does this point
            raise SettingError(f"{point} is trial {earlier[0]}'s")
        return work(point)

    return run_worker(study, objective, trials=None, grid=True)


def trial_summary(trial: FrozenTrial) -> dict[str, Any]:
    """A trial as plain data: number, state, value, parameters, run folder, minutes, compute share."""
    minutes = None
    if trial.datetime_start and trial.datetime_complete:
        minutes = round((trial.datetime_complete - trial.datetime_start).total_seconds() / 60, 2)
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "params": trial.params,
        "run": trial.user_attrs.get("run"),
        "minutes": minutes,
        "compute": trial.user_attrs.get("compute"),  # share of the base config's training compute
        OVER_BUDGET: bool(trial.user_attrs.get(OVER_BUDGET)),
    }
