"""What the study's storage costs per trial: `run_worker` (stale-trial check, ask, worker and heartbeat attributes,
tell) around an objective that does nothing, on a journal file, with 1 and with 2 worker processes sharing it.

    python benchmarks/sweep_storage.py [--trials 60] [--json OUT.json]

A real trial trains for minutes, so this overhead (milliseconds, growing with the trials in the study, since each
worker reads the journal) is what the mechanism adds; the sweep's trials per hour come from the trials themselves.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

from pneumolab.sweep.study import open_storage, open_study, run_worker


def _worker(folder: str, trials: int, results) -> None:
    study = open_study("bench", open_storage(None, folder))
    started = time.perf_counter()  # the worker loop alone, not the process start and imports
    done = run_worker(study, lambda trial: trial.suggest_float("x", 0.0, 1.0), trials=trials)
    results.put((time.perf_counter() - started, done))


def measure(workers: int, trials: int) -> dict[str, float]:
    """Each worker's loop time per trial it finished; the slowest worker's figure."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        open_study("bench", open_storage(None, folder))  # created once, so the workers only join
        processes = [context.Process(target=_worker, args=(folder, trials, results)) for _ in range(workers)]
        for process in processes:
            process.start()
        per_worker = [results.get(timeout=600) for _ in processes]
        for process in processes:
            process.join()
    per_trial = max(seconds / max(done, 1) for seconds, done in per_worker)
    return {"workers": workers, "trials": sum(d for _, d in per_worker), "ms_per_trial": round(1000 * per_trial, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [measure(workers, args.trials) for workers in (1, 2)]
    for row in rows:
        print(f"{row['workers']} worker(s): {row['trials']} trials, {row['ms_per_trial']} ms a trial")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
