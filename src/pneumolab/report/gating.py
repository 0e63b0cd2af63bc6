"""The "Input gate and referral" part of a run's section: the gate's and band's facts, refusals per group, selective
prediction on validation and test, and whether the band's per-class guarantee held. A K-class run has a gate but no
band (``band_note`` says so) and no risk-coverage curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pneumolab.report._analyses import (
    gating_analysis,
)
from pneumolab.report._format import GATING_PLOTS, MISSING, as_count, as_percent
from pneumolab.report._runfiles import GATE_GROUPS, SPLIT_NAMES, RunFiles, finite
from pneumolab.report.sections import plot_entry

GATING_CAPTIONS = {
    "gate_scores": (
        "Input gate scores",
        "Share of each group's images per bin of the gate's score (higher: less like the training films); the dashed "
        "line is the limit, set on validation: above it an image is refused. DICOM files refused by their metadata "
        "have no score and are not drawn.",
    ),
    "risk_coverage": (
        "Risk-coverage",
        "The films the gate let through, most confident first (largest |p - threshold|): accuracy of the answered "
        "films against the share of all films answered; each curve ends at the share the gate passes. Diamonds: the "
        "fitted referral band (from metrics/selective.json); its edges need not lie symmetrically about the "
        "threshold, so a diamond can sit off its curve.",
    ),
}


def alpha_text(value: float) -> str:
    return f"{100 * value:g} %"


def share_count(share: float | None, n: int | None) -> str:
    """``3.4 % (8 of 234)``: a share of a class's films, with the count it stands for."""
    if share is None:
        return MISSING
    count = f" ({round(share * n):,} of {n:,})" if n else ""
    return f"{as_percent(share)} %{count}"


def gate_fact_rows(gate: dict[str, Any]) -> list[tuple[str, str]]:
    facts = [("Score", str(gate.get("score") or "not recorded"))]
    layers = gate.get("layers")
    if isinstance(layers, list) and layers:
        facts.append(("Layers", ", ".join(str(layer) for layer in layers)))
    facts.append(("Fit on", str(gate.get("fit_on") or "not recorded")))
    limit = finite(gate.get("limit"))
    facts.append(("Limit", f"{limit:.3f} (refused above)" if limit is not None else "not recorded"))
    return facts  # where the limit was set is said in words beside the refusals


def band_fact_rows(referral: dict[str, Any]) -> list[tuple[str, str]]:
    """The band's facts, without its nominal level: that is shown only beside the realised shares (per class)."""
    facts = [("Method", str(referral.get("method") or "not recorded"))]
    facts.append(("Fit on", str(referral.get("fit_on") or "not recorded")))
    threshold = finite(referral.get("threshold"))
    if threshold is not None:
        facts.append(("Threshold", f"{threshold:.3f} (the model's)"))
    band = referral.get("band")
    if isinstance(band, list) and len(band) == 2 and all(finite(v) is not None for v in band):
        facts.append(("Referred", f"P(PNEUMONIA) from {float(band[0]):.3f} to {float(band[1]):.3f}"))
    return facts


def refusal_rows(groups: list[dict[str, Any]]) -> list[dict[str, str]]:
    rows = []
    for group in groups:
        name = group["group"]
        description = GATE_GROUPS.get(name, (name, ""))[1]
        rows.append(
            {
                "group": name,
                "description": description,
                "n": MISSING if group["n"] is None else f"{group['n']:,}",
                "refused": MISSING if group["refused"] is None else f"{group['refused']:,}",
                "share": as_percent(group["share"]),
            }
        )
    return rows


def guarantee_sentence(alpha: float | None, test: dict[str, Any] | None) -> tuple[str | None, bool]:
    """The sentence on the band's per-class guarantee on test (None without test figures), and whether it fails."""
    if alpha is None or test is None:
        return None, False
    per_class = test.get("per_class") or {}
    realised = [
        (name, finite((per_class.get(name) or {}).get("wrong_answered")), (per_class.get(name) or {}).get("n"))
        for name in ("NORMAL", "PNEUMONIA")
    ]
    realised = [(name, share, n) for name, share, n in realised if share is not None]
    if not realised:
        return None, False
    above = [(name, share, n) for name, share, n in realised if share > alpha]
    if above:
        shares = " and ".join(f"{name} {share_count(share, n)}" for name, share, n in above)
        return (
            f"On test the guarantee fails under the validation-test shift: {shares} of the films were answered "
            f"wrongly, more than the nominal {alpha_text(alpha)} per class that the band was fit for on validation. "
            "The "
            "bound holds only for films exchangeable with validation, and the test films are not.",
            True,
        )
    shares = " and ".join(f"{name} {share_count(share, n)}" for name, share, n in realised)
    return (
        f"On test the realised shares of films answered wrongly, {shares}, stay within the nominal {alpha_text(alpha)} "
        "per class; the bound itself is promised only for films exchangeable with validation, which the test films "
        "are not.",
        False,
    )


def selective_rows(summaries: dict[str, dict[str, Any]], alpha: float | None) -> tuple[list, list]:
    """(one row per split: films, refused, referred, answered, accuracies; one row per split and class)."""
    splits, classes = [], []
    for split, summary in summaries.items():
        name = SPLIT_NAMES.get(split, split)
        n = summary.get("n")
        splits.append(
            {
                "split": name,
                "n": as_count(finite(n)),
                "refused": as_count(finite(summary.get("refused"))),
                "referred": as_count(finite(summary.get("referred"))),
                "answered": as_count(finite(summary.get("answered"))),
                "coverage": as_percent(finite(summary.get("coverage"))),
                "accuracy_answered": as_percent(finite(summary.get("accuracy_answered"))),
                "accuracy_all": as_percent(finite(summary.get("accuracy_all"))),
            }
        )
        for label, facts in (summary.get("per_class") or {}).items():
            facts = facts or {}
            wrong, total = finite(facts.get("wrong_answered")), facts.get("n")
            total = int(total) if finite(total) is not None else None
            above = alpha is not None and wrong is not None and wrong > alpha
            classes.append(
                {
                    "split": name,
                    "class": str(label),
                    "n": as_count(total),
                    "answered": share_count(finite(facts.get("answered")), total),
                    "wrong_answered": share_count(wrong, total),
                    "alpha": MISSING if alpha is None else alpha_text(alpha),
                    "verdict": MISSING if wrong is None or alpha is None else ("above" if above else "within"),
                    "above": above,
                }
            )
    return splits, classes


def gating_section(run: RunFiles, slug: str, written: dict[str, Path]) -> dict[str, Any] | None:
    """The "Input gate and referral" part of a run, formatted; None for a run without a gate (an ensemble)."""
    found = gating_analysis(run)
    if found is None:
        return None
    gate, referral = found["gate"], found["referral"]
    alpha = finite((referral or {}).get("alpha"))
    groups = {g["group"]: g for g in found["groups"]}
    statement = None
    if gate is not None or "test" in groups:
        limit_set_on = (gate or {}).get("limit_set_on") or "validation (how: not recorded)"
        statement = f"The limit was set on {limit_set_on}; nothing of the gate was fit on test."
        test = groups.get("test")
        if test is not None:
            of = f" of the {test['n']:,}" if test["n"] is not None else " of the"
            statement += (
                f" The gate refused {as_percent(test['share'])} %{of} test films: they are real chest X-rays, so this "
                "is a false-refusal rate, reported here, not fit."
            )
    splits, classes = selective_rows(found["summaries"], alpha)
    guarantee, fails = guarantee_sentence(alpha, found["summaries"].get("test"))
    plots = {
        key: plot_entry(run, slug, key, written[key], *GATING_CAPTIONS[key]) if key in written else None
        for key in GATING_PLOTS
    }
    return {
        "band_note": "No referral band: none is fit for K-class runs, whose decision is the argmax of their "
        "class probabilities (the band's guarantee is written for one threshold on one probability); every film "
        "the gate passes is answered."
        if run.is_multiclass
        else None,
        "gate_facts": gate_fact_rows(gate) if gate is not None else [],
        "statement": statement,
        "groups": refusal_rows(found["groups"]),
        "band_facts": band_fact_rows(referral) if referral is not None else [],
        "splits": splits,
        "classes": classes,
        "guarantee": guarantee,
        "guarantee_fails": fails,
        "gate_plot": plots["gate_scores"],
        "risk_plot": plots["risk_coverage"],
        "notes": found["notes"],
    }
