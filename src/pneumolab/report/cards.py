"""The model card of each run in the report: intended use, data, training facts, metrics, limitations, machine.

A K-class run's card names its classes and task, shows its K-class metrics, its decision rule (`decision_rule`) and
its derived binary views, and says in its limitations that the kinds come from file names and that there is no
referral band for K classes.
"""

from __future__ import annotations

from typing import Any

from pneumolab.errors import PneumolabError
from pneumolab.evaluate.calibration import ThresholdSelector
from pneumolab.report._format import (
    CARD_METRICS,
    METRIC_COLUMNS,
    MISSING,
    MULTICLASS_COLUMNS,
    VIEW_COLUMNS,
    as_count,
    as_percent,
    as_score,
    member_names,
    metric_cell,
    nested_get,
    pneumonia_sum,
)
from pneumolab.report._runfiles import KIND_VIEW, PNEUMONIA_VIEW, Evaluation, RunFiles, finite

RANDOM_INIT_TEXT = "random initialisation (no ImageNet weights here)"
"""How a backbone that started from random weights is described; such a model is never called pretrained."""


REFERENCES = (
    ("Kermany et al., Cell 2018 (InceptionV3, ImageNet weights)", "92.8", "93.2", "90.1", "0.968"),
    ("MedMNIST v2 ResNet-50 (28 px upsampled to 224)", "88.4", "", "", "0.962"),
    ("MedMNIST v2 Google AutoML Vision", "94.6", "", "", "0.991"),
)


INTENDED_USE = (
    "Research and teaching on pediatric chest X-ray classification (NORMAL vs PNEUMONIA): comparing training recipes, "
    "architectures and evaluation methods.",
    "Not a medical device. Not for diagnosis, triage, screening or any other clinical decision; it has not been "
    "validated clinically, prospectively or on any population other than its test set.",
    "Input: one frontal chest X-ray of a child. Adults, lateral views and findings other than pneumonia are out of "
    "scope.",
)


DATA_FACTS = (
    "Kermany D. S., Goldbaum M., Cai W. et al. (2018), Identifying Medical Diagnoses and Treatable Diseases by "
    "Image-Based Deep Learning, Cell 172(5):1122-1131.",
    "Dataset: Kermany D., Zhang K., Goldbaum M. (2018), Labeled Optical Coherence Tomography (OCT) and Chest X-Ray "
    "Images for Classification, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2; licence CC BY 4.0.",
    "Anterior-posterior chest X-rays of pediatric patients aged 1-5 years from a single centre, Guangzhou Women and "
    "Children's Medical Center (Guangzhou, China), graded by physicians; bacterial and viral pneumonia are both "
    "labelled PNEUMONIA.",
    "Official split: train/ 5,216 images (1,341 NORMAL, 3,875 PNEUMONIA), test/ 624 images (234 NORMAL, "
    "390 PNEUMONIA). Validation is carved from train/ by patient; test/ chose nothing.",
)


TASK_TEXT = {
    "kind": "kind: NORMAL / BACTERIAL / VIRAL, a PNEUMONIA film's kind read from its file name (personN_bacteria_M, "
    "personN_virus_M)",
    "folders": "folders: one class per class folder",
}

KIND_LABELS_LIMITATION = (
    "The BACTERIAL and VIRAL labels come from the release's file names (personN_bacteria_M, personN_virus_M), not "
    "from laboratory confirmation; the kind of pneumonia is harder to tell from a film than pneumonia itself, and "
    "mixed or other infections have no class of their own."
)

NO_BAND_LIMITATION = (
    "No referral band for K classes: every film the input gate passes gets a class, however unsure the model is; "
    "no film is sent to a radiologist for lying near the decision (the band's guarantee is written for one threshold "
    "on one probability)."
)


def intended_use(run: RunFiles) -> tuple[str, ...]:
    """`INTENDED_USE`, with a K-class run's classes in place of NORMAL vs PNEUMONIA."""
    if not run.is_multiclass:
        return INTENDED_USE
    first = INTENDED_USE[0].replace("NORMAL vs PNEUMONIA", " / ".join(run.classes))
    return (first, *INTENDED_USE[1:])


def data_facts(run: RunFiles) -> tuple[str, ...]:
    """`DATA_FACTS`, and for a K-class run how its classes come from the release."""
    if not run.is_multiclass:
        return DATA_FACTS
    if run.classes == ("NORMAL", "BACTERIAL", "VIRAL"):
        how = (
            "This model's classes, NORMAL, BACTERIAL and VIRAL, split the PNEUMONIA folder by the kind each file "
            "name states (personN_bacteria_M, personN_virus_M)."
        )
    else:
        how = f"This model's classes: {', '.join(run.classes)}."
    return (*DATA_FACTS, how)


def threshold_rule(run: RunFiles) -> str:
    """How the run's thresholds were fit, in words (``evaluated_with`` of its operating point)."""
    settings = nested_get(run.operating_point, "evaluated_with") or {}
    method = settings.get("threshold_method")
    if not method:
        return "fit on validation (rule not recorded)"
    try:
        return ThresholdSelector(str(method), target_sensitivity=settings.get("target_sensitivity")).describe()
    except (PneumolabError, TypeError, ValueError):
        return f"{method} on validation"


def decision_rule(run: RunFiles, tta: bool) -> str:
    """A K-class variant's decision rule in words: method, temperature, class bias and whether cross-fitting on
    validation showed that the bias helps (the two balanced accuracies)."""
    point = run.variant_point(tta)
    if point is None:
        evaluation = run.evaluation("test", tta) or run.evaluation("val", tta)
        method = nested_get(evaluation.metrics if evaluation else None, "threshold_method")
        return f"{method or 'argmax'} (no operating_point.json: temperature and class bias not recorded)"
    parts = [str(point.get("method") or "argmax (how: not recorded)")]
    temperature = finite(point.get("temperature"))
    if temperature is not None:
        parts.append(f"T = {temperature:.2f}")
    else:  # an ensemble records its temperature as null: its combination is not scaled
        parts.append("no temperature scaling" if "temperature" in point else "temperature not recorded")
    bias = point.get("class_bias")
    if isinstance(bias, list) and len(bias) == len(run.classes) and all(finite(b) is not None for b in bias):
        terms = ", ".join(f"{name} {float(b):+.3f}" for name, b in zip(run.classes, bias, strict=True))
        parts.append(f"class bias {terms} (added to the scaled logits)")
    check = point.get("class_bias_check")
    if isinstance(check, dict):
        folds = finite(check.get("folds"))
        plain, biased = finite(check.get("balanced_accuracy_argmax")), finite(check.get("balanced_accuracy_with_bias"))
        if folds and plain is not None and biased is not None:
            verdict = "so the bias is used" if check.get("helps") else "so no bias is used"
            parts.append(
                f"cross-fitting on validation ({int(folds)} folds): balanced accuracy {as_percent(plain)} % by plain "
                f"argmax, {as_percent(biased)} % with a class bias, {verdict}"
            )
        else:
            parts.append("too few validation films of some class to cross-fit a class bias, so none is used")
    return "; ".join(parts)


def view_summary(evaluation: Evaluation, view: str) -> str:
    """A derived binary view's accuracy, sensitivity, specificity and ROC-AUC with intervals, and its threshold."""
    metrics = evaluation.view_metrics(view)
    if metrics is None:
        return "not recorded"
    shown = Evaluation(evaluation.split, evaluation.tta, metrics)
    values = []
    for key, header, unit in VIEW_COLUMNS:
        cell = metric_cell(shown, key, unit)
        suffix = " %" if unit == "%" and cell["value"] != MISSING else ""
        interval = f" ({cell['interval']})" if cell["interval"] else ""
        values.append(f"{header.lower() if key != 'roc_auc' else header} {cell['value']}{suffix}{interval}")
    threshold = as_score(shown.metric("threshold"))
    if view == PNEUMONIA_VIEW:
        what = f"{pneumonia_sum(evaluation.classes)} >= {threshold}"
    else:
        films = as_count(shown.metric("n"))
        what = f"{films} pneumonia films, P(VIRAL) / ({pneumonia_sum(evaluation.classes)}) >= {threshold}"
    return f"{what}: " + ", ".join(values)


def describe_weights(source: str | None, *, ensemble: dict[str, Any] | None = None) -> str:
    """Say in words what a backbone started from.

    Args:
        source: ``env.json``'s ``weights_source``: ``imagenet:<source>``, ``random``, ``file:<path>`` or None.
        ensemble: ``env.json``'s ``ensemble`` entry, for an ensemble folder.

    Returns:
        A phrase for tables and model cards; ``random`` becomes `RANDOM_INIT_TEXT`, never "pretrained".
    """
    if ensemble is not None or source == "ensemble":
        names = member_names((ensemble or {}).get("members"))
        method = (ensemble or {}).get("method")
        how = f" ({method})" if method else ""
        return f"ensemble{how} of {', '.join(names)}" if names else f"ensemble{how} of evaluated runs"
    if not source:
        return "not recorded"
    if source in ("random", "none"):
        return RANDOM_INIT_TEXT
    if source == "imagenet":
        return "ImageNet weights (source not recorded)"
    if source.startswith("imagenet:"):
        return f"ImageNet weights ({source.removeprefix('imagenet:')})"
    if source.startswith("file:"):
        return f"weights file {source.removeprefix('file:')}"
    return source


def weights_source_of(run: RunFiles) -> str | None:
    source = nested_get(run.env, "weights_source")
    if not source:
        for evaluation in run.evaluations.values():
            source = source or nested_get(evaluation.metrics, "weights_source")
    if not source:
        requested = nested_get(run.config, "model", "weights")
        source = {"none": "random", "imagenet": "imagenet"}.get(requested) if requested else None
        if requested and source is None:
            source = f"file:{requested}"
    return str(source) if source else None


def training_facts(run: RunFiles, weights: str) -> list[tuple[str, str]]:
    if run.ensemble is not None:
        ensemble = run.ensemble
        weights_list = ensemble.get("weights")
        return [
            ("Kind", "ensemble of evaluated runs (no training of its own)"),
            ("Method", str(ensemble.get("method") or "not recorded")),
            ("Members", ", ".join(member_names(ensemble.get("members"))) or "not recorded"),
            (
                "Member weights",
                ", ".join(f"{w:.3g}" if finite(w) is not None else str(w) for w in weights_list)
                if isinstance(weights_list, list)
                else "not recorded",
            ),
            ("Fitted on", "the members' validation predictions"),
        ]
    config = run.config
    if config is None:
        return [("Initial weights", weights), ("Training settings", "not recorded (no config.yaml)")]

    def setting(*keys: str) -> str:
        value = nested_get(config, *keys)
        return MISSING if value is None else str(value)

    epochs_run = len(run.history) if run.history is not None else None
    epochs = f"{setting('epochs')} planned"
    if epochs_run is not None:
        epochs += f", {epochs_run} run"
    if run.best_epoch is not None:
        epochs += f", best epoch {run.best_epoch} (selected on {setting('select_metric')})"
    head = nested_get(config, "model", "head")
    facts = [
        ("Architecture", setting("model", "name") + (f" ({head} head)" if head else "")),
    ]
    if run.is_multiclass:
        task = nested_get(config, "data", "task")
        facts.append(("Task", TASK_TEXT.get(str(task), str(task)) if task else "not recorded"))
        facts.append(("Classes", ", ".join(run.classes)))
    facts += [
        ("Initial weights", weights),
        ("Strategy", f"{setting('strategy')} (freeze: {setting('freeze')})"),
        ("Epochs", epochs),
        ("Image size", f"{setting('image_size')} px"),
        ("Augmentation preset", setting("augment", "preset")),
        (
            "Optimiser",
            f"{setting('optim', 'optimizer')}, lr {setting('optim', 'lr')}, weight decay "
            f"{setting('optim', 'weight_decay')}, batch size {setting('batch_size')}",
        ),
        ("Loss", f"cross-entropy, class weights {setting('loss', 'class_weights')}"),
        ("Precision", str(nested_get(run.env, "precision") or setting("precision"))),
    ]
    fraction = finite(nested_get(config, "data", "val_fraction"))
    folds, design = nested_get(config, "data", "folds"), nested_get(config, "data", "split_design") or "random"
    order = f"seed {setting('data', 'split_seed')}" if design == "random" else f"{design} patients by number"
    if folds:
        share = f"fold {int(nested_get(config, 'data', 'fold')) + 1} of {folds} of train/"
        facts.append(("Validation split", f"{share}, grouped by patient ({order})"))
    elif fraction is not None:
        facts.append(("Validation split", f"{100 * fraction:.0f} % of train/, grouped by patient ({order})"))
    return facts


def multiclass_card_items(run: RunFiles, evaluation: Evaluation) -> list[tuple[str, str]]:
    """A K-class test variant's card facts: classes, K-class metrics, decision rule, derived views, images."""
    items = [("Classes", ", ".join(evaluation.classes))]
    for key, header, unit in MULTICLASS_COLUMNS:
        cell = metric_cell(evaluation, key, unit)
        suffix = " %" if unit == "%" and cell["value"] != MISSING else ""
        interval = f" (95 % CI {cell['interval']})" if cell["interval"] else ""
        items.append((header, f"{cell['value']}{suffix}{interval}"))
    items.append(("Decision", decision_rule(run, evaluation.tta)))
    items.append(("Pneumonia vs normal view", view_summary(evaluation, PNEUMONIA_VIEW)))
    items.append(("Bacterial vs viral view (VIRAL positive)", view_summary(evaluation, KIND_VIEW)))
    per_class = evaluation.metrics.get("n_per_class") or {}
    counts = ", ".join(f"{as_count(finite(per_class.get(c)))} {c}" for c in evaluation.classes)
    items.append(("Images", f"{as_count(evaluation.metric('n'))} ({counts})"))
    return items


def card_metrics(run: RunFiles) -> list[dict[str, Any]]:
    blocks = []
    for tta in (False, True):
        evaluation = run.evaluation("test", tta)
        if evaluation is None or evaluation.metrics is None:
            continue
        if evaluation.is_multiclass:
            blocks.append(
                {
                    "label": evaluation.label,
                    "chosen": run.chosen_tta == tta,
                    "facts": multiclass_card_items(run, evaluation),
                }
            )
            continue
        items = []
        for key in CARD_METRICS:
            unit = next(u for k, _, u in METRIC_COLUMNS if k == key)
            header = next(h for k, h, _ in METRIC_COLUMNS if k == key)
            cell = metric_cell(evaluation, key, unit)
            suffix = " %" if unit == "%" and cell["value"] != MISSING else ""
            interval = f" (95 % CI {cell['interval']})" if cell["interval"] else ""
            items.append((header, f"{cell['value']}{suffix}{interval}"))
        temperature = evaluation.metric("temperature")
        method = evaluation.metrics.get("threshold_method") or "how chosen: not recorded"
        items.append(("Threshold", f"{as_score(evaluation.metric('threshold'))}, {method}"))
        items.append(("Temperature", "none" if temperature is None else f"{temperature:.2f}"))
        items.append(
            ("Images", f"{as_count(evaluation.metric('n'))} ({as_count(evaluation.metric('n_positive'))} PNEUMONIA)")
        )
        blocks.append({"label": evaluation.label, "chosen": run.chosen_tta == tta, "facts": items})
    return blocks


def limitations_of(run: RunFiles, weights: str) -> list[str]:
    gap = ""
    auc, auc_name = ("macro_roc_auc", "macro ROC-AUC") if run.is_multiclass else ("roc_auc", "ROC-AUC")
    for tta in (False, True):
        val, test = run.evaluation("val", tta), run.evaluation("test", tta)
        if val and test and val.metric(auc) is not None and test.metric(auc) is not None:
            gap = (
                f" For this model{' with TTA' if tta else ''}: validation {auc_name} {val.metric(auc):.3f} vs "
                f"test {test.metric(auc):.3f}"
            )
            if val.metric("accuracy") is not None and test.metric("accuracy") is not None:
                gap += f", accuracy {as_percent(val.metric('accuracy'))} % vs {as_percent(test.metric('accuracy'))} %"
            gap += "."
            break
    items = [
        "Single-centre pediatric data (one hospital, ages 1-5): performance on adults, other hospitals, scanners, "
        "image processing or populations is unknown.",
        "Label noise: labels are physicians' gradings of the images, not confirmed diagnoses; some are wrong or "
        "debatable, which also limits what any metric here can show.",
        "Frontal views only: no lateral views and no clinical context (symptoms, history, laboratory results)"
        + (
            "; the kind of pneumonia is told from the film alone."
            if run.is_multiclass
            else "; bacterial and viral pneumonia are not told apart."
        ),
        "Distribution shift: a different device, exposure, resolution, compression or patient mix can change the "
        "predictions without any warning; the release also holds exact duplicate images.",
        "The validation set is easier than test: it is carved from train/, and scores near 1.0 there say little "
        "about test." + gap,
    ]
    if run.is_multiclass and "BACTERIAL" in run.classes:
        items.append(KIND_LABELS_LIMITATION)
    if weights == RANDOM_INIT_TEXT:
        items.append(
            "Trained from random initialisation, not from ImageNet weights: on about 5,000 images such models usually "
            "generalise worse than ImageNet-initialised ones."
        )
    if run.gate_facts is None:
        items.append(
            "No input gate: this model labels anything that decodes (a photo, a CT slice); serve it only behind a "
            "check that the input is a frontal chest X-ray."
        )
    elif run.is_multiclass:
        items.append(
            "The input gate refuses what is unlike the training films, measured on pictures, other modalities and "
            "altered test films; it was never measured on adult films, other hospitals' films or other X-ray body "
            "parts, and it is no proof that an answered image is a chest X-ray; see the section Input gate and "
            "referral for how it held."
        )
    else:
        items.append(
            "The input gate refuses what is unlike the training films, measured on pictures, other modalities and "
            "altered test films; it was never measured on adult films, other hospitals' films or other X-ray body "
            "parts, and it is no proof that an answered image is a chest X-ray. The referral band was fit on "
            "validation, which is easier than test; see the section Input gate and referral for how it held."
        )
    if run.is_multiclass:
        items.append(NO_BAND_LIMITATION)
    temperature = None
    for evaluation in run.evaluations.values():
        temperature = temperature or evaluation.metric("temperature")
    chosen = run.variant_point(bool(run.chosen_tta)) or {}
    if run.is_multiclass and finite(chosen.get("temperature")) is not None:
        temperature = finite(chosen["temperature"])  # the variant the model uses
    if temperature is not None:
        scaled = "temperature-scaled"
        if run.is_multiclass and chosen.get("class_bias"):
            scaled = "temperature-scaled and shifted by a class bias"
        items.append(
            f"Probabilities are {scaled} on validation (T = {temperature:.2f}); they are not calibrated "
            "for other populations."
        )
    return items


def machine_facts(run: RunFiles) -> list[tuple[str, str]]:
    env = run.env
    if env is None:
        return [("Machine", "not recorded (no env.json)")]
    facts = []
    for label, keys in (
        ("CPU", ("cpu",)),
        ("CPU cores", ("cpu_count",)),
        ("GPU", ("cuda_device",)),
        ("Precision", ("precision",)),
        ("Processes", ("world_size",)),
        ("Python", ("python",)),
        ("PyTorch", ("packages", "torch")),
        ("Git commit", ("git_sha",)),
    ):
        value = nested_get(env, *keys)
        if label == "GPU" and value is None and "cpu" in env:
            value = "none (CPU only)"
        if value is not None:
            facts.append((label, str(value)[:12] if label == "Git commit" else str(value)))
    return facts or [("Machine", "not recorded in env.json")]
