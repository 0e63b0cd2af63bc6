"""`pneumolab sweep --show`: what a study found, read back from its storage alone.

Writes ``OUT/sweep-<study>/``: ``sweep.md`` and ``sweep.html`` (the best trials, every trial's state, parameter
importances, the optimisation history; Optuna's matplotlib visualisations, the HTML with its images inline),
``images/*.png``, ``study.json`` (the same as data) and ``best.yaml``: the best trial's settings as a pipeline config
that ``pneumolab run --config`` accepts, which is how the chosen configuration meets test, once.
"""

from __future__ import annotations

import base64
import html
import os
import warnings
from pathlib import Path
from typing import Any

import matplotlib
import optuna
import yaml
from optuna.trial import TrialState

from pneumolab.config import TrainConfig, apply_overrides
from pneumolab.errors import SettingError
from pneumolab.fsutil import atomic_dir, write_json_atomic
from pneumolab.sweep.study import OVER_BUDGET, load_study, open_storage, trial_summary

__all__ = ["best_pipeline", "show_study"]


def best_pipeline(study: optuna.Study) -> dict[str, Any]:
    """The best trial's training settings as a pipeline config (one model named after the study)."""
    definition = study.user_attrs.get("definition") or {}
    if definition.get("kind") != "search":
        raise SettingError(f"study {study.study_name!r} is not a search (a cv or comparison grid has no best config)")
    best = study.best_trial
    train = apply_overrides(TrainConfig.model_validate(definition["base"]), best.params)
    pipeline = definition["pipeline"]
    return {
        "title": f"{pipeline['title']}: best of sweep {study.study_name} (trial {best.number})",
        "data": pipeline["data"],
        "evaluate": pipeline["evaluate"],
        "models": [{"name": f"{study.study_name}-best", "train": train.model_dump(mode="json", exclude={"data"})}],
    }


def _figures(study: optuna.Study, folder: Path) -> dict[str, str]:
    """PNG files of Optuna's matplotlib plots; a plot that cannot be made yet (too few trials) is skipped."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    made = {}
    plots = {
        "history": optuna_plots.plot_optimization_history,
        "importances": optuna_plots.plot_param_importances,
        "intermediate": optuna_plots.plot_intermediate_values,
    }
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks these plots experimental
                axes = plot(study)
        except (ValueError, RuntimeError):
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(7, 4)
        figure.tight_layout()
        path = folder / "images" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=110)
        plt.close(figure)
        made[name] = path.name
    return made


def _importances(study: optuna.Study) -> dict[str, float] | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError):  # fewer than two complete trials, or one parameter only
        return None


def _table(rows: list[dict[str, Any]], keys: list[str]) -> list[list[str]]:
    return [[_cell(row, key) for key in ["number", "state", "value", "minutes", "compute", *keys]] for row in rows]


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "state" and row.get(OVER_BUDGET):
        return "over budget (not trained)"
    value = row.get(key, row["params"].get(key))
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(title: str, header: list[str], rows: list[list[str]], facts: list[str], images: dict[str, str]) -> str:
    lines = [f"# {title}", "", *[f"- {fact}" for fact in facts], "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    lines.extend(["", *[f"![{name}](images/{file})" for name, file in images.items()], ""])
    return "\n".join(lines)


def _html(title: str, header: list[str], rows: list[list[str]], facts: list[str], folder: Path, images) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    pictures = "".join(
        f'<img alt="{name}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / "images" / file).read_bytes()).decode()}">'
        for name, file in images.items()
    )
    items = "".join(f"<li>{html.escape(f)}</li>" for f in facts)
    style = "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
        f"</head><body><h1>{html.escape(title)}</h1><ul>{items}</ul><table><tr>{head}</tr>{body}</table>"
        f"{pictures}</body></html>"
    )


def show_study(study_name: str, *, storage: str | None, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the study's page, data and (for a search) best config under ``out/sweep-<study>/``; return the data."""
    study = load_study(study_name, open_storage(storage, out))
    trials = [trial_summary(t) for t in study.get_trials(deepcopy=False)]
    definition = study.user_attrs.get("definition") or {}
    complete = [t for t in trials if t["state"] == TrialState.COMPLETE.name]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: t["value"], reverse=maximize)
    states = {s.name: sum(t["state"] == s.name for t in trials) for s in TrialState}
    objective = (definition.get("space") or {}).get("objective", "value")
    summary: dict[str, Any] = {
        "study": study_name,
        "direction": "maximize" if maximize else "minimize",
        "objective": objective,
        "states": {k: v for k, v in states.items() if v},
        "best": ranked[:5],
        "trials": trials,
        "importances": _importances(study) if complete else None,
    }
    target = Path(out) / f"sweep-{study_name}"
    with atomic_dir(target) as building:
        images = _figures(study, building) if complete else {}
        if complete and definition.get("kind") == "search":
            summary["best_config"] = str(target / "best.yaml")
            (building / "best.yaml").write_text(yaml.safe_dump(best_pipeline(study), sort_keys=False))
        keys = sorted({k for t in trials for k in t["params"]})
        header = ["trial", "state", objective, "minutes", "compute (x base)", *keys]
        rows = _table(ranked + [t for t in trials if t not in ranked], keys)
        facts = [
            f"{len(trials)} trials: " + ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items()),
            f"objective: {objective} ({summary['direction']}), on validation only",
        ]
        budget = (definition.get("space") or {}).get("budget")
        if budget is not None:
            skipped = sum(t[OVER_BUDGET] for t in trials)
            facts.append(f"budget: {budget} of the base config's training compute; {skipped} points over it skipped")
        if summary["importances"]:
            shares = ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items())
            facts.append(f"importances (fANOVA): {shares}")
        if "best_config" in summary:
            facts.append(f"best config: {summary['best_config']} (evaluate it once: pneumolab run --config ...)")
        title = f"Sweep {study_name}"
        (building / "sweep.md").write_text(_markdown(title, header, rows, facts, images))
        (building / "sweep.html").write_text(_html(title, header, rows, facts, building, images))
        write_json_atomic(building / "study.json", summary)
    summary["page"] = str(target / "sweep.html")
    return summary
