"""How well does validation predict test, per validation design? The gaps (test minus validation) of accuracy,
specificity, sensitivity and log loss for fold models (or any evaluated runs), grouped by the design of their carve.

    python benchmarks/validation_design.py runs/cv-default/mnv2-full/fold-* runs/cv-latest/mnv2-full/fold-* \
        [--json OUT.json]

Each run is read as `pneumolab` evaluated it: the variant its operating point chose on validation (plain or TTA),
its threshold fit on validation (for the default recipe: sensitivity >= 95 % there). A design is good for selection
when its gaps are small and stable, and its sensitivity on test keeps the validation target. Test figures are the
runs' one evaluation each; nothing here is chosen on them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from pneumolab.config import load_config
from pneumolab.evaluate.runner import saved_metrics
from pneumolab.runs import RunDir

METRICS = ("accuracy", "recall", "specificity", "log_loss", "roc_auc")


def run_row(path: Path) -> dict:
    run = RunDir(path)
    data = load_config(run.config).data
    val, test = saved_metrics(run, "val"), saved_metrics(run, "test")
    row = {"run": str(path), "design": data.split_design, "fold": data.fold, "folds": data.folds, "n_val": val["n"]}
    row["held_out"] = held_out(data.split_design, data.fold, data.folds)
    for key in METRICS:
        row[f"val_{key}"], row[f"test_{key}"] = val[key], test[key]
        row[f"gap_{key}"] = test[key] - val[key]
    return row


def held_out(design: str, fold: int | None, folds: int | None) -> str:
    """Which patients a run's validation holds: a time-ordered fold is a block of consecutive patient numbers."""
    if fold is None:
        return f"{design} carve"
    if design == "random":
        return f"random fold {fold + 1} of {folds}"
    rank = fold if design == "latest" else folds - 1 - fold  # 0: the latest-numbered block
    if rank in (0, folds - 1):
        return "latest-numbered" if rank == 0 else "earliest-numbered"
    return f"block {rank + 1} of {folds} from the latest"


def design_summary(rows: list[dict]) -> dict:
    """Per kind of held-out patients (random folds together): the mean gap of each metric and the largest one."""
    summary = {}
    kinds = [r["design"] if r["design"] == "random" else r["held_out"] for r in rows]
    for design in dict.fromkeys(kinds):
        own = [r for r, kind in zip(rows, kinds, strict=True) if kind == design]
        summary[design] = {"runs": len(own)}
        for key in METRICS:
            gaps = [r[f"gap_{key}"] for r in own]
            summary[design][key] = {"mean_gap": mean(gaps), "worst_gap": max(gaps, key=abs)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="evaluated run folders (fold runs of `pneumolab cv`)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = [run_row(path) for path in args.runs]
    print("| held out | val n | accuracy val / test / gap | sensitivity val / test | specificity val / test / "
          "gap | log loss val / test / ratio |")  # fmt: skip
    print("|---|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['held_out']} | {r['n_val']} "
            f"| {100 * r['val_accuracy']:.1f} / {100 * r['test_accuracy']:.1f} / {100 * r['gap_accuracy']:+.1f} "
            f"| {100 * r['val_recall']:.1f} / {100 * r['test_recall']:.1f} "
            f"| {100 * r['val_specificity']:.1f} / {100 * r['test_specificity']:.1f} / "
            f"{100 * r['gap_specificity']:+.1f} "
            f"| {r['val_log_loss']:.3f} / {r['test_log_loss']:.3f} / {r['test_log_loss'] / r['val_log_loss']:.1f}x |"
        )
    summary = design_summary(rows)
    for design, figures in summary.items():
        gaps = ", ".join(f"{k} {v['mean_gap']:+.3f}" for k, v in figures.items() if k != "runs")
        print(f"{design} ({figures['runs']} runs): mean gaps (test - validation): {gaps}")
    if args.json:
        args.json.write_text(json.dumps({"runs": rows, "designs": summary}, indent=2))


if __name__ == "__main__":
    main()
