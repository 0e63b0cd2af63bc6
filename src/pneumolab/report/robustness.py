"""The "Robustness" part of a run's section: the stress evaluation that `pneumolab evaluate --stress` (or the
pipeline) wrote to ``metrics/stress.json``: a table per split (each perturbation at each strength beside the clean
films), the framing curve (sensitivity and specificity against how tightly the film is framed) and the films whose
label flips most easily, with Grad-CAM of the first few clean and under the case that moved them most."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pneumolab.report._format import MISSING
from pneumolab.report._runfiles import RunFiles
from pneumolab.report.plots import save_figure
from pneumolab.report.sections import plot_entry

__all__ = ["plot_framing_curve", "robustness_section"]

_FRAMING_CAPTION = (
    "How tightly the film is framed (left of 1: the central share of the side kept, a tighter crop; right of 1: the "
    "film shrunk inside a border, a looser frame), against the sensitivity and specificity at the model's own "
    "threshold. A model that reads the lungs, not the framing, draws flat lines."
)


def _percent(value: Any) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


def _signed_points(value: Any) -> str:
    return "" if value is None else f"{100 * value:+.1f}"


def _rows(block: dict[str, Any]) -> list[dict[str, str]]:
    binary = "sensitivity" in block["clean"]

    def row(name: str, m: dict[str, Any]) -> dict[str, str]:
        return {
            "case": name,
            "accuracy": _percent(m.get("accuracy")),
            "sensitivity": _percent(m.get("sensitivity")) if binary else MISSING,
            "specificity": _percent(m.get("specificity")) if binary else MISSING,
            "delta_sensitivity": _signed_points(m.get("delta_sensitivity")),
            "delta_specificity": _signed_points(m.get("delta_specificity")),
            "roc_auc": MISSING if m.get("roc_auc") is None else f"{m['roc_auc']:.3f}",
            "log_loss": f"{m['log_loss']:.3f}",
            "mean_abs_change": f"{m['mean_abs_change']:.3f}",
            "flip_rate": _percent(m.get("flip_rate")),
        }

    return [row("clean", block["clean"]), *(row(key, case) for key, case in block["cases"].items())]


def _framing_points(block: dict[str, Any]) -> dict[str, list[tuple[float, float, float]]]:
    """Per border kind, (frame side / film side, sensitivity, specificity); tighter crops at side < 1."""
    clean = block["clean"]
    tighter = [(1.0, clean["sensitivity"], clean["specificity"])]
    looser: dict[str, list[tuple[float, float, float]]] = {"frame_black": [], "frame_edge": []}
    for case in block["cases"].values():
        if "sensitivity" not in case:
            continue
        point = (case["strength"], case["sensitivity"], case["specificity"])
        if case["perturbation"] == "crop":
            tighter.append(point)
        elif case["perturbation"] in looser:
            looser[case["perturbation"]].append(point)
    curves = {}
    for kind, points in looser.items():
        if points or len(tighter) > 1:
            curves[kind] = sorted(tighter + points)
    return curves


def plot_framing_curve(blocks: dict[str, dict[str, Any]], *, title: str | None = None) -> Figure | None:
    """Sensitivity and specificity against framing, one panel per split; None without framing cases (or K classes)."""
    panels = {split: _framing_points(block) for split, block in blocks.items()}
    panels = {split: curves for split, curves in panels.items() if curves}
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 3.6), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (split, curves) in zip(axes, panels.items(), strict=True):
        for kind, points in curves.items():
            x, sens, spec = (np.array(v) for v in zip(*points, strict=True))
            border = "black border" if kind == "frame_black" else "edge border"
            style = "-" if kind == "frame_black" else "--"
            ax.plot(x, 100 * sens, marker="o", linestyle=style, color="tab:red", label=f"sensitivity ({border})")
            ax.plot(x, 100 * spec, marker="s", linestyle=style, color="tab:blue", label=f"specificity ({border})")
        ax.axvline(1.0, color="0.6", linewidth=0.8)
        ax.set_xlabel("framing: crop share (< 1)  |  frame / film side (> 1)")
        ax.set_ylabel("%")
        ax.set_title(f"{split}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    if title:
        fig.suptitle(title)
    return fig


def read_stress(run: RunFiles) -> dict[str, dict[str, Any]] | None:
    path = run.run_dir.stress_metrics  # {split: stress block} (evaluate.runner.stress_model)
    if not path.is_file():
        return None
    try:
        blocks = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return blocks if isinstance(blocks, dict) and blocks else None


def _film_name(flipper: dict[str, Any]) -> str:
    return Path(flipper["path"]).name if flipper.get("path") else f"film {flipper['index']}"


def _flipper_heatmaps(run: RunFiles, slug: str, images: Path, split: str, block: dict[str, Any]) -> list[dict]:
    """The flippers' Grad-CAM panels that the stress evaluation drew in the run (``plots/stress/``), as plots."""
    heatmaps = []
    for k, f in enumerate(block.get("flippers", [])):
        drawn = run.path / f["gradcam"] if f.get("gradcam") else None
        if drawn is None or not drawn.is_file():
            continue
        copy = images / slug / f"stress_{split}_{k}.png"
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(drawn, copy)
        caption = f"Grad-CAM of {f.get('gradcam_target', '')}: clean, and under {f['largest_change_by']}."
        heatmaps.append(plot_entry(run, slug, f"stress_{split}_{k}", copy, f"{_film_name(f)} ({f['label']})", caption))
    return heatmaps


def robustness_section(run: RunFiles, slug: str, images: Path) -> dict[str, Any] | None:
    """The robustness part of a run, formatted; None when the run has no stress evaluation."""
    blocks = read_stress(run)
    if blocks is None:
        return None
    plot = None
    fig = plot_framing_curve(blocks, title=run.name)
    if fig is not None:
        path = save_figure(fig, images / slug / "stress_framing.png")
        plot = plot_entry(run, slug, "stress_framing", path, "Framing curve", _FRAMING_CAPTION)
    splits = []
    for split, block in blocks.items():
        splits.append(
            {
                "split": split,
                "n": block.get("n"),
                "seed": block.get("seed"),
                "binary": "sensitivity" in block["clean"],
                "rows": _rows(block),
                "stress_log_loss": None if block.get("stress_log_loss") is None else f"{block['stress_log_loss']:.4f}",
                "flippers": [
                    {
                        "path": _film_name(f),
                        "label": f["label"],
                        "clean_probability": f"{f['clean_probability']:.3f}",
                        "largest_change": f"{f['largest_change']:.3f}",
                        "flipped_by": ", ".join(f["flipped_by"]) or "none",
                    }
                    for f in block.get("flippers", [])
                ],
                "heatmaps": _flipper_heatmaps(run, slug, images, split, block),
            }
        )
    return {"plot": plot, "splits": splits}
