"""A finished sweep's throughput, per session of workers: trials per hour, and trained compute per hour.

    python benchmarks/sweep_throughput.py --study NAME --out DIR [--storage URL] [--first-trial N] [--json OUT.json]

Workers whose spans (first trial started to last trial finished) overlap form one session; a study resumed later by
other workers has several. Trials per hour depend on which points the sampler proposed (a pruned trial is short),
so each session also gives the compute it trained per hour, in units of the base config's whole training (the
`compute` share each trial records, times the share of its epochs it trained), which is comparable across
sessions whose trials differ. `--first-trial` leaves out earlier trials (one that shared the machine, say).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from optuna.trial import FrozenTrial, TrialState

from pneumolab.sweep.study import OVER_BUDGET, WORKER_ATTR, load_study, open_storage

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _trained_compute(trial: FrozenTrial) -> float:
    """The base's whole training is 1.0; a trial pruned after k of its n epochs trained k/n of its share."""
    epochs = int(trial.params.get("epochs") or 0) or len(trial.intermediate_values) or 1
    return float(trial.user_attrs.get("compute", 0.0)) * len(trial.intermediate_values) / epochs


def _sessions(trials: list[FrozenTrial]) -> list[list[FrozenTrial]]:
    """Group trials by worker, then merge workers whose spans overlap."""
    by_worker: dict[tuple[str, int], list[FrozenTrial]] = {}
    for trial in trials:
        worker = trial.user_attrs.get(WORKER_ATTR) or {}
        by_worker.setdefault((worker.get("host", "?"), int(worker.get("pid", 0))), []).append(trial)
    spans = sorted(
        (min(t.datetime_start for t in ts), max(t.datetime_complete for t in ts), ts) for ts in by_worker.values()
    )
    sessions: list[tuple[datetime, list[FrozenTrial]]] = []
    for start, end, ts in spans:
        if sessions and start <= sessions[-1][0]:
            sessions[-1] = (max(end, sessions[-1][0]), sessions[-1][1] + ts)
        else:
            sessions.append((end, list(ts)))
    return [ts for _, ts in sessions]


def summarise(trials: list[FrozenTrial]) -> list[dict[str, float]]:
    rows = []
    for session in _sessions([t for t in trials if t.state in FINISHED]):
        counted = [t for t in session if not t.user_attrs.get(OVER_BUDGET)]
        hours = (max(t.datetime_complete for t in session) - min(t.datetime_start for t in session)).total_seconds()
        hours /= 3600
        trained = sum(_trained_compute(t) for t in counted)
        rows.append(
            {
                "workers": len({json.dumps(t.user_attrs.get(WORKER_ATTR)) for t in session}),
                "trials": [t.number for t in counted],
                "complete": sum(t.state == TrialState.COMPLETE for t in counted),
                "pruned": sum(t.state == TrialState.PRUNED for t in counted),
                "over_budget": len(session) - len(counted),
                "hours": round(hours, 3),
                "trials_per_hour": round(len(counted) / hours, 1),
                "trained_compute": round(trained, 2),
                "base_trainings_per_hour": round(trained / hours, 2),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--out", required=True, help="the sweep's --out (its journal, unless --storage)")
    parser.add_argument("--storage")
    parser.add_argument("--first-trial", type=int, default=0, help="leave out the trials numbered below this")
    parser.add_argument("--json")
    args = parser.parse_args()
    trials = load_study(args.study, open_storage(args.storage, args.out)).trials
    rows = summarise([t for t in trials if t.number >= args.first_trial])
    print("| Workers | Counted (complete / pruned) | Skipped | Wall (h) | Trials per hour | Base trainings per hour |")
    print("|--:|---|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['workers']} | {len(r['trials'])} ({r['complete']} / {r['pruned']}) | {r['over_budget']} | "
              f"{r['hours']:.2f} | {r['trials_per_hour']} | {r['base_trainings_per_hour']} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
