"""The ``pneumolab`` command: thin Typer commands that parse, call the library and print.

Bad input ends with one line on stderr naming the file and the reason, and exit status 2; ``--debug`` shows the
traceback instead. ``--json`` prints one JSON object on stdout and nothing else there (progress goes to stderr).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pneumolab.constants import __version__
from pneumolab.errors import PneumolabError, SettingError

__all__ = ["app", "main"]

app = typer.Typer(
    name="pneumolab",
    help="Chest X-ray pneumonia classification: data, training, evaluation, explanation and serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Get, check and prepare a dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")

stdout = Console(soft_wrap=True)


def _error_line(text: str) -> None:
    """One plain line on stderr: no colour, no wrapping, so scripts can grep it."""
    sys.stderr.write(text.replace("\n", " ") + "\n")


DataDir = Annotated[Path, typer.Argument(help="Dataset folder (Kaggle layout: train/, test/, optional val/).")]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
QuietFlag = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ForceFlag = Annotated[
    bool,
    typer.Option(
        "--force", help="Replace --out even when it is not a folder this command writes (its files are deleted)."
    ),
]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        help="A run folder, exported artefact or ensemble, or a bundled model's name (pneumolab.list_bundled(); "
        "default: mobilenetv2-128-kermany-binary-v2, alias default)."
    ),
]
BackendOption = Annotated[
    str,
    typer.Option(
        help="pytorch, or onnx (onnxruntime on the CPU; --model may then also be an .onnx file with its card, "
        "and a run or artefact is exported on the fly)."
    ),
]


NoGateFlag = Annotated[
    bool,
    typer.Option(
        "--no-gate",
        help="Research use: turn the input gate and referral band off (every readable file gets a label; "
        "every output says so).",
    ),
]


StudyOption = Annotated[str | None, typer.Option(help="Optuna study name (workers with the same one share it).")]
StorageOption = Annotated[
    str | None,
    typer.Option(
        help="Where the study lives: a journal file (default OUT/study.journal; shared file systems too) or an RDB "
        "URL such as postgresql://user@host/db for a cluster."
    ),
]


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _version(value: bool) -> None:
    if value:
        stdout.print(f"pneumolab {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Chest X-ray pneumonia classification."""  # --debug is read by `main`, which sees the exception


@data_app.command("check")
def data_check(
    data: DataDir,
    json_out: JsonFlag = False,
    near_bits: Annotated[
        int, typer.Option(help="Bits of the 256-bit perceptual hash that may differ in near duplicates.")
    ] = 12,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: all cores).")] = None,
    quiet: QuietFlag = False,
    task: Annotated[
        str, typer.Option(help="binary (NORMAL / PNEUMONIA), kind (NORMAL / BACTERIAL / VIRAL) or folders.")
    ] = "binary",
) -> None:
    """Counts per split and class of a task, patients, unreadable or unlabelled files, duplicates and leakage."""
    from pneumolab.data.check import check_dataset

    report = check_dataset(data, workers=workers, near_bits=near_bits, progress=not quiet and not json_out, task=task)
    if json_out:
        _print_json(report)
    else:
        _print_check(report)
    for entry in report["unlabelled"]:
        _error_line(f"{entry['path']}: {entry['reason']}")
    if report["unreadable"] or report["unlabelled"]:
        raise typer.Exit(2)


def _print_check(report: dict[str, Any]) -> None:
    stdout.print(f"[bold]{escape(str(report['root']))}[/bold]: {report['n_images']:,} readable images")
    table = Table("split", *report["classes"], "total", "patients")
    for split, counts in report["counts"].items():
        per_class = [f"{counts[name]:,}" for name in report["classes"]]
        table.add_row(split, *per_class, f"{counts['total']:,}", f"{report['patients'][split]:,}")
    stdout.print(table)
    if report["patient_ids_one_per_file"]:
        stdout.print(f"{report['patient_ids_one_per_file']:,} file names match no known pattern: one patient per file.")
    for name, label in (("exact_duplicates", "exact duplicate"), ("near_duplicates", "near-duplicate")):
        dup = report[name]
        stdout.print(
            f"{dup['n_groups']} {label} groups ({dup['n_images']} images): {dup['cross_split_groups']} cross "
            f"splits, {dup['conflicting_label_groups']} have conflicting labels, "
            f"{dup['cross_patient_groups']} span patients"
        )
    for pair, crossing in report["patients_across_splits"].items():
        if crossing["n"]:
            examples = ", ".join(crossing["examples"])
            stdout.print(
                f"patient ids in both {pair.replace('&', ' and ')}: {crossing['n']} (e.g. {examples})", markup=False
            )
    if report["skipped"]:
        stdout.print(f"{len(report['skipped'])} files skipped (not images), e.g. {report['skipped'][0]}", markup=False)
    for bad in report["unreadable"]:
        _error_line(f"{Path(report['root']) / bad['path']}: {bad['reason']}")


@data_app.command("prepare")
def data_prepare(
    data: DataDir,
    size: Annotated[int, typer.Option(help="Side of the cached square images, in pixels.")] = 256,
    cache: Annotated[Path | None, typer.Option(help="Cache folder (default: the user's cache folder).")] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: all cores).")] = None,
    skip_unreadable: Annotated[bool, typer.Option(help="Leave unreadable files out instead of failing.")] = False,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Decode every image once into a uint8 memory-mapped cache (a no-op when the data did not change)."""
    from pneumolab.data.cache import prepare_cache

    cached, built = prepare_cache(
        data,
        size=size,
        cache_root=cache,
        workers=workers,
        skip_unreadable=skip_unreadable,
        progress=not quiet and not json_out,
    )
    summary = {"cache": str(cached.path), "built": built, "n": len(cached.manifest), "size": cached.size}
    if json_out:
        _print_json(summary)
    else:
        verb = "built" if built else "up to date"
        stdout.print(f"cache {verb}: {cached.path} ({summary['n']:,} images, {cached.size} px)", markup=False)


@data_app.command("split")
def data_split(
    data: DataDir,
    out: Annotated[Path, typer.Option(help="Where to write the split CSV.")] = Path("split.csv"),
    val_fraction: Annotated[float, typer.Option(help="Share of train (per label) carved out for validation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the patient choice.")] = 0,
    design: Annotated[
        str, typer.Option(help="Which patients: random (by seed), or by patient number (latest, earliest).")
    ] = "random",
    json_out: JsonFlag = False,
) -> None:
    """Carve the patient-grouped, label-stratified validation split from train and write split.csv."""
    from pneumolab.data.dataset import build_manifest, find_dataset_root
    from pneumolab.data.splits import carve_validation, check_design, write_split

    check_design(design)
    manifest = build_manifest(find_dataset_root(data))
    splits = carve_validation(manifest, fraction=val_fraction, seed=seed, design=design)
    write_split(manifest, splits, out)
    counts = manifest.groupby([splits, "label_name"]).size().unstack(fill_value=0)
    summary = {"split_csv": str(out), "counts": {s: row.to_dict() for s, row in counts.iterrows()}}
    if json_out:
        _print_json(summary)
    else:
        stdout.print(f"wrote {out}", markup=False)
        stdout.print(counts.to_string())


@data_app.command("download")
def data_download(
    source: Annotated[str, typer.Option(help="kaggle, medmnist or url.")] = "kaggle",
    to: Annotated[Path, typer.Option(help="Folder to download into.")] = Path("data"),
    url: Annotated[str | None, typer.Option(help="Zip URL (with --source url), e.g. a Mendeley mirror.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the zip (--source url).")] = None,
    size: Annotated[int, typer.Option(help="MedMNIST+ image size (28, 64, 128 or 224).")] = 224,
    quiet: QuietFlag = False,
) -> None:
    """Download the dataset (Kaggle, MedMNIST+ PneumoniaMNIST, or any zip URL) and show where it is."""
    from pneumolab.data import download as dl
    from pneumolab.data.dataset import find_dataset_root
    from pneumolab.errors import did_you_mean

    if source == "kaggle":
        folder = dl.download_kaggle(to, progress=not quiet)
    elif source == "medmnist":
        folder = dl.download_medmnist(to, size=size, progress=not quiet)
    elif source == "url":
        if not url:
            raise SettingError("--source url needs --url URL")
        folder = dl.download_url(url, to, sha256=sha256, progress=not quiet)
    else:
        raise did_you_mean("source", source, ["kaggle", "medmnist", "url"])
    root = find_dataset_root(folder)
    stdout.print(f"dataset ready: {root}\nnext: pneumolab data check {root}", markup=False)


@app.command("models")
def models_command(
    pattern: Annotated[str, typer.Argument(help="Shell-style filter, e.g. 'resnet*'.")] = "*",
    json_out: JsonFlag = False,
) -> None:
    """List the architectures, their input size and whether ImageNet weights are available offline here."""
    from pneumolab.api import list_models

    rows = list_models(pattern)
    if json_out:
        _print_json({"models": rows})
        return
    table = Table("model", "input", "features", "ImageNet weights here")
    for row in rows:
        here = "yes" if row["imagenet_here"] else "no (trains from scratch)"
        table.add_row(row["name"], str(row["input_size"]), str(row["feature_dim"]), here)
    stdout.print(table)
    stdout.print("sources: pneumolab models --json")


@app.command("train")
def train_command(
    data: Annotated[Path | None, typer.Option(help="Dataset folder (Kaggle layout).")] = None,
    model: Annotated[str | None, typer.Option(help="Architecture name (see `pneumolab models`).")] = None,
    weights: Annotated[str | None, typer.Option(help="imagenet, none, or a weights file.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="Training config YAML, or a pipeline config (a study, file or shipped recipe name) with --only; "
            "the flags below override it."
        ),
    ] = None,
    only: Annotated[
        str | None, typer.Option(help="The model of a pipeline --config to train (its training settings).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/<model>-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out after its last finished epoch.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per batch (per process under torchrun).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Training and evaluation input size in pixels.")] = None,
    freeze: Annotated[str | None, typer.Option(help="full, plan, linear or gradual.")] = None,
    head: Annotated[str | None, typer.Option(help="linear, plan or attention.")] = None,
    augment: Annotated[str | None, typer.Option(help="Augmentation preset: plan, cxr or none.")] = None,
    strategy: Annotated[str | None, typer.Option(help="finetune, or features (frozen-feature fast path).")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the order, augmentation and initial weights.")] = None,
    ema: Annotated[bool | None, typer.Option("--ema/--no-ema", help="Validate and keep an EMA of weights.")] = None,
    deterministic: Annotated[bool, typer.Option(help="Deterministic algorithms only (slower).")] = False,
    tensorboard: Annotated[bool, typer.Option(help="Write TensorBoard scalars into RUN/tensorboard.")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    max_batches: Annotated[int | None, typer.Option(help="Cap on batches per epoch (smoke tests).")] = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Train a model into a run folder (config, split, history, checkpoints, env)."""
    from pneumolab.api import train_model

    summary = train_model(
        config,
        only=only,
        overrides={
            "data.root": str(data) if data else None,
            "model.name": model,
            "model.weights": weights,
            "model.head": head,
            "augment.preset": augment,
            "optim.lr": lr,
            "epochs": epochs,
            "batch_size": batch_size,
            "image_size": image_size,
            "freeze": freeze,
            "strategy": strategy,
            "precision": precision,
            "seed": seed,
            "ema": ema,
            "deterministic": deterministic or None,
            "tensorboard": tensorboard or None,
            "threads": threads,
            "max_batches": max_batches,
        },
        out=out,
        resume=resume,
        progress=not quiet and not json_out,
    )
    if summary.get("epochs") is None:  # a non-zero torchrun rank: rank 0 reports
        return
    if json_out:
        _print_json(summary)
    else:
        stdout.print(
            f"run: {summary['run']} (best epoch {summary['best_epoch']}, {summary['wall_seconds']} s)", markup=False
        )


@app.command("evaluate")
def evaluate_command(
    model: Annotated[
        Path,
        typer.Argument(help="A trained run folder, an exported artefact, or a bundled model's name (e.g. default)."),
    ],
    data: Annotated[Path | None, typer.Option(help="Dataset folder (default: the run's).")] = None,
    split: Annotated[str, typer.Option(help="Which split's metrics to print: val or test.")] = "test",
    tta: Annotated[bool, typer.Option(help="Print the metrics with test-time augmentation.")] = False,
    tta_views: Annotated[str, typer.Option(help="TTA preset (plan, cxr) or comma-separated views.")] = "cxr",
    threshold: Annotated[
        str,
        typer.Option(
            help="How the threshold is chosen on validation: balanced_accuracy, youden, f1, target_sensitivity, fixed."
        ),
    ] = "balanced_accuracy",
    target_sensitivity: Annotated[float | None, typer.Option(help="With --threshold target_sensitivity.")] = None,
    choose_by: Annotated[
        str,
        typer.Option(
            help="Validation metric that chooses TTA or plain: log_loss, brier, roc_auc, stress_log_loss (log loss "
            "over the clean and the stress selection set's perturbed films)."
        ),
    ] = "log_loss",
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples for the 95 % intervals.")] = 2000,
    force: Annotated[bool, typer.Option(help="Evaluate again even if the run's metrics are up to date.")] = False,
    no_gate: Annotated[
        bool, typer.Option("--no-gate", help="Artefacts: do not report what the input gate and band do.")
    ] = False,
    stress: Annotated[
        bool,
        typer.Option(
            help="Also the stress evaluation on --split: the metrics on perturbed copies of its films (framing, "
            "exposure, resolution, JPEG, rotation, shift, markers); a `stress` block in the JSON."
        ),
    ] = False,
    stress_set: Annotated[
        str, typer.Option(help="With --stress: selection, framing, standard, or name:strength cases, comma-separated.")
    ] = "standard",
    stress_seed: Annotated[int, typer.Option(help="With --stress: seeds every film's perturbation.")] = 0,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Evaluate a run on validation and test (operating point fit on validation) and print the metrics.

    A run's input gate (training split) and referral band (validation) are fit here too. An exported artefact or
    the bundled model is evaluated with its card's operating point, gate and band on the chosen split: the metrics
    are of all its films, and `selective` says how many the gate refused or the band referred and the accuracy of
    the rest.
    """
    from pneumolab.api import evaluate_model

    metrics = evaluate_model(
        model,
        data,
        split=split,
        tta=tta,
        tta_views=tta_views,
        threshold=threshold,
        target_sensitivity=target_sensitivity,
        choose_by=choose_by,
        resamples=resamples,
        force=force,
        gate=not no_gate,
        progress=not quiet and not json_out,
    )
    if stress:
        from pneumolab.evaluate.runner import stress_model

        blocks = stress_model(
            model, data=data, splits=(split,), cases=stress_set, seed=stress_seed, progress=not quiet and not json_out
        )
        metrics["stress"] = blocks[split]
    if json_out:
        _print_json(metrics)
        return
    _print_metrics(metrics)
    if "selective" in metrics:  # an artefact or bundled model: what its gate and band did
        _print_selective(metrics["selective"])
    if stress:
        _print_stress(metrics["stress"])


def _print_stress(block: dict[str, Any]) -> None:
    binary = "sensitivity" in block["clean"]
    columns = ["case", "accuracy", *(["sensitivity", "specificity", "ROC-AUC"] if binary else []), "log loss"]
    table = Table(*columns, "mean |dP|", "flips", title=f"stress on {block['split']} ({block['n']} films)")
    keys = ["accuracy", *(["sensitivity", "specificity", "roc_auc"] if binary else []), "log_loss"]

    def row(name: str, m: dict[str, Any]) -> list[str]:
        cells = [f"{m[k]:.3f}" if k in ("roc_auc", "log_loss") else f"{m[k]:.1%}" for k in keys]
        return [name, *cells, f"{m['mean_abs_change']:.3f}", f"{m['flip_rate']:.1%}"]

    table.add_row(*row("clean", block["clean"]))
    for key, case in block["cases"].items():
        table.add_row(*row(key, case))
    stdout.print(table)
    if "stress_log_loss" in block:
        stdout.print(f"stress log loss (clean + the selection set): {block['stress_log_loss']:.4f}", markup=False)


def _print_selective(selective: dict[str, Any]) -> None:
    if "n" not in selective:
        stdout.print(f"input gate: {selective['gate']}", markup=False)
        return
    accuracy = selective["accuracy_answered"]
    stdout.print(
        f"input gate {selective['gate']}: of {selective['n']} films {selective['refused']} refused, "
        f"{selective['referred']} referred, {selective['answered']} answered "
        f"({selective['coverage']:.1%}); accuracy of the answered "
        f"{'n/a' if accuracy is None else f'{accuracy:.1%}'} (all films at this threshold: "
        f"{selective['accuracy_all']:.1%})",
        markup=False,
    )


def _print_metrics(metrics: dict[str, Any]) -> None:
    table = Table("metric", "value", "95 % interval")
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "specificity", "f1",
                "average_precision", "roc_auc", "accuracy_at_0.5"):  # fmt: skip
        low, high = metrics["ci95"][key]
        table.add_row(key, f"{metrics[key]:.4f}", f"{low:.4f} - {high:.4f}")
    stdout.print(table)
    (tn, fp), (fn, tp) = metrics["confusion_matrix"]
    temperature = "none" if metrics.get("temperature") is None else f"{metrics['temperature']:.3f}"
    stdout.print(
        f"{metrics['split']}: n={metrics['n']}, threshold {metrics['threshold']:.4f} ({metrics['threshold_method']}), "
        f"temperature {temperature}, confusion [[tn {tn}, fp {fp}], [fn {fn}, tp {tp}]]",
        markup=False,
    )


@app.command("ensemble")
def ensemble_command(
    runs: Annotated[list[Path], typer.Argument(help="Evaluated run folders (two or more).")],
    out: Annotated[Path, typer.Option(help="Folder for the ensemble's predictions and metrics.")] = Path(
        "runs/ensemble"
    ),
    method: Annotated[str, typer.Option(help="mean, weighted or stacking (fit on validation).")] = "mean",
    threshold: Annotated[str, typer.Option(help="How the threshold is chosen on validation.")] = "balanced_accuracy",
    target_sensitivity: Annotated[float | None, typer.Option(help="With --threshold target_sensitivity.")] = None,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Combine evaluated runs from their saved predictions (members may differ in architecture and size)."""
    from pneumolab.evaluate.runner import ensemble_runs

    if target_sensitivity is not None and threshold == "balanced_accuracy":
        threshold = "target_sensitivity"
    results = ensemble_runs(
        runs, out, method=method, threshold_method=threshold, target_sensitivity=target_sensitivity, force=force
    )
    if json_out:
        _print_json(results["test"])
    else:
        _print_metrics(results["test"])
        stdout.print(f"ensemble written to {out}", markup=False)


@app.command("report")
def report_command(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (trained and evaluated, or ensembles).")],
    out: Annotated[Path, typer.Option(help="Folder for report.html, report.md and images.")] = Path("report"),
    title: Annotated[str, typer.Option(help="Report title.")] = "pneumolab report",
) -> None:
    """Write the comparison report: one self-contained HTML page and its Markdown twin."""
    from pneumolab.report import build_report

    files = build_report(runs, out, title=title)
    stdout.print(f"report: {files['html']}", markup=False)


@app.command("run")
def run_command(
    data: Annotated[
        Path | None, typer.Option(help="Dataset folder (default: the config's, else data/chest_xray).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="Pipeline config: a file, or a shipped recipe's name (default: the default recipe)."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder: one run per model, the ensemble, the report (default: runs/<recipe>)."),
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Train and evaluate only this model of the config (repeatable); others already trained and "
            "evaluated in --out (checkpoints not needed) join the ensemble and report."
        ),
    ] = None,
    study: StudyOption = None,
    storage: StorageOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """The main job: prepare -> train each model -> evaluate (with and without TTA) -> ensemble -> report.

    With --study, the models are spread over every worker started with the same study and storage (each model
    trained once, into the shared --out); each worker then writes the ensemble and report from what is there."""
    from pneumolab.api import run

    summary = run(
        config, data=data, out=out, only=only, study=study, storage=storage, progress=not quiet and not json_out
    )
    if json_out:
        _print_json(summary)
    else:
        stdout.print(f"report: {summary['report']} ({summary['wall_seconds']} s)", markup=False)


@app.command("cv")
def cv_command(
    config: Annotated[
        Path | None,
        typer.Option(help="Pipeline config, file or shipped recipe name (each model, or --only, is cross-validated)."),
    ] = None,
    folds: Annotated[int, typer.Option(help="Number of patient-grouped, label-stratified folds over train/.")] = 5,
    out: Annotated[Path, typer.Option(help="Output folder: OUT/<model>/fold-<k>/, oof.csv, cv.json.")] = Path(
        "runs/cv"
    ),
    data: Annotated[
        Path | None, typer.Option(help="Dataset folder (default: the config's, else data/chest_xray).")
    ] = None,
    design: Annotated[
        str, typer.Option(help="Which patients make a fold: random, or by patient number (latest, earliest).")
    ] = "random",
    only: Annotated[list[str] | None, typer.Option(help="Cross-validate only this model (repeatable).")] = None,
    fold: Annotated[
        list[int] | None, typer.Option(help="Train only this fold (repeatable; the summary waits for all).")
    ] = None,
    study: StudyOption = None,
    storage: StorageOption = None,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Cross-validate: one run per fold, the out-of-fold predictions of all of train/, per-metric mean and spread,
    and the CV ensemble (the fold models' mean, operating point fit out of fold) evaluated once on test.

    With --study, the folds are spread over every worker started with the same study and storage."""
    from pneumolab.cv import run_cv
    from pneumolab.pipeline import load_pipeline_config
    from pneumolab.recipes import recipe_path

    pipeline = load_pipeline_config(recipe_path(config))
    if study is not None:
        from pneumolab.sweep.spread import spread_cv

        spread_cv(pipeline, out, study=study, folds=folds, design=design, storage=storage, data=data, only=only,
                  progress=not quiet and not json_out)  # fmt: skip
    summaries = run_cv(
        pipeline,
        out,
        folds=folds,
        design=design,
        data=data,
        only=only,
        folds_to_run=fold,
        progress=not quiet and not json_out,
    )
    if json_out:
        _print_json(summaries)
        return
    for model, summary in summaries.items():
        if summary is None:
            stdout.print(
                f"{model}: folds still missing; the summary is written once all {folds} are evaluated", markup=False
            )
            continue
        stdout.print(f"{model}: {folds}-fold CV ({summary['design']}), {out / model / 'cv.json'}", markup=False)
        for key, spread in summary["per_fold"]["val"].items():
            test = summary["per_fold"]["test"][key]
            stdout.print(
                f"  {key:<18} val {_mean_std(spread)}   test {_mean_std(test)}   "
                f"out-of-fold {_number(summary['out_of_fold'][key])}   CV ensemble test "
                f"{_number(summary['cv_ensemble_test'][key])}"
            )


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _mean_std(spread: dict[str, Any]) -> str:
    return f"{_number(spread['mean'])} +- {_number(spread['std'])}"


@app.command("sweep")
def sweep_command(
    study: Annotated[str, typer.Option(help="Optuna study name (workers with the same one share it).")],
    config: Annotated[
        Path | None,
        typer.Option(help="Pipeline config, file or shipped recipe name: its data, evaluation and the model swept."),
    ] = None,
    space: Annotated[Path | None, typer.Option(help="Search space YAML (keys of a training config).")] = None,
    storage: StorageOption = None,
    trials: Annotated[int, typer.Option(min=1, help="Finished trials the study aims for (all workers together).")] = 20,
    out: Annotated[Path, typer.Option(help="Output folder: OUT/trials/trial-<n>/, the study page.")] = Path(
        "runs/sweep"
    ),
    model: Annotated[str | None, typer.Option(help="The config's model to start from (when it has several).")] = None,
    folds: Annotated[
        int | None, typer.Option(min=2, help="Objective: the mean over this many CV folds (each trial trains all).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Dataset folder (default: the config's, else data/chest_xray).")
    ] = None,
    show: Annotated[
        bool, typer.Option("--show", help="Write the study's page and best config (OUT/sweep-<study>/); no training.")
    ] = False,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Search training settings with Optuna on validation only (TPE, median pruning); start the same command on
    more machines, or more times on one, with the same --study and --storage to add workers."""
    if show:
        from pneumolab.sweep.show import show_study

        summary = show_study(study, storage=storage, out=out)
        if json_out:
            _print_json(summary)
            return
        stdout.print(f"study {study}: {summary['states']}; page {summary['page']}", markup=False)
        for trial in summary["best"]:
            stdout.print(
                f"  trial {trial['number']}: {summary['objective']} {trial['value']:.5g}  {trial['params']}",
                markup=False,
            )
        if "best_config" in summary:
            stdout.print(f"best config: {summary['best_config']}", markup=False)
        return
    if space is None:
        raise SettingError("--space SPACE.yaml is needed to run a sweep (or pass --show to read one back)")
    from pneumolab.pipeline import load_pipeline_config
    from pneumolab.recipes import recipe_path
    from pneumolab.sweep.search import run_sweep
    from pneumolab.sweep.space import load_space

    summary = run_sweep(
        load_pipeline_config(recipe_path(config)),
        load_space(space),
        study_name=study,
        out=out,
        storage=storage,
        trials=trials,
        model=model,
        folds=folds,
        data=data,
        progress=not quiet and not json_out,
    )
    if json_out:
        _print_json(summary)
    else:
        stdout.print(
            f"study {study}: this worker finished {summary['trials_by_this_worker']} trials; "
            f"pneumolab sweep --study {study} --show --out {out} writes the page and best config",
            markup=False,
        )


@app.command("predict")
def predict_command(
    paths: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively) or glob patterns.")],
    model: ModelOption = None,
    json_out: JsonFlag = False,
    csv_out: Annotated[
        bool, typer.Option("--csv", help="Print CSV (file,status,label,probability,threshold,reason,...).")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    backend: BackendOption = "pytorch",
    no_gate: NoGateFlag = False,
    dicom_out: Annotated[
        Path | None,
        typer.Option(
            "--dicom-out",
            help="Also write DICOM results of the DICOM inputs here: one TID 1500 SR per study and one Grad-CAM "
            "secondary capture per film not refused (needs the pacs extra).",
        ),
    ] = None,
) -> None:
    """Predict NORMAL / PNEUMONIA for X-ray files (JPEG, PNG, DICOM) with the model's validation-fit threshold.

    Each file is first checked by the input gate: what is not a frontal chest X-ray is `refused` (no label, no
    probability), a film the model is unsure of is `refer` (label kept, send it to a radiologist), the rest
    `answered`. A file that cannot be read gets its own error line on stderr; the others are still predicted; the
    exit status is then 2.
    """
    import csv

    from pneumolab.api import load_model

    loaded = load_model(model, backend=backend, gate=not no_gate)
    trained = loaded.inference_model
    predictions = loaded.predict(paths, batch_size=batch_size, errors="collect")
    rows, failures = [p.as_dict() for p in predictions], predictions.errors
    if dicom_out is not None:
        from pneumolab.pacs.results import results_for_rows

        written, no_result = results_for_rows(trained, rows, dicom_out)
        _error_line(f"--dicom-out: {len(written)} DICOM result files in {dicom_out}")
        for file, reason in no_result:
            _error_line(f"{file}: note: {reason}")
    gate = trained.gate_status
    if json_out:
        _print_json(
            {
                "model": {**trained.card(), "backend": trained.backend},
                "gate": gate,
                "predictions": rows,
                "errors": [{"file": f, "reason": r} for f, r in failures],
            }
        )
    elif csv_out:
        # one column per class (p_NORMAL, p_PNEUMONIA, ...) beside probability, P(not the first class)
        per_class = [f"p_{name}" for name in trained.classes]
        fields = ["file", "status", "label", "probability", *per_class, "threshold", "reason", "gate_score", "notes"]
        writer = csv.DictWriter(sys.stdout, fieldnames=[*fields, "gate"], lineterminator="\n")
        writer.writeheader()
        for row in rows:
            every = row["probabilities"] or {}
            writer.writerow({**{k: row[k] for k in fields if k in row}, **{f"p_{c}": every.get(c) for c in every},
                             "gate": gate})  # fmt: skip
    else:
        if gate != "on":
            _error_line(f"input gate: {gate}")
        many = len(trained.classes) > 2
        table = Table("file", "status", "label", "probability" if not many else "class probabilities", "reason")
        for row in rows:
            every = row["probabilities"]
            if row["probability"] is None:
                shown = ""
            elif many:
                shown = "  ".join(f"{c} {p:.3f}" for c, p in every.items())
            else:
                shown = f"{row['probability']:.4f} (threshold {row['threshold']:.4f})"
            # file names and reasons are text, not markup: `a[/b].jpeg` must print as it is
            file, reason = escape(row["file"]), escape(row["reason"]) if row["reason"] else row["reason"]
            table.add_row(file, row["status"], row["label"], shown, reason, end_section=False)
        stdout.print(table)
    for row in rows:
        if row["notes"]:
            _error_line(f"{row['file']}: note: {row['notes']}")
    for file, reason in failures:
        _error_line(f"{file}: {reason}")
    if failures:
        raise typer.Exit(2)


@app.command("export")
def export_command(
    model: Annotated[Path, typer.Argument(help="A trained, evaluated run folder (or an artefact folder).")],
    out: Annotated[Path | None, typer.Option(help="Artefact folder, or a path ending in .onnx for ONNX.")] = None,
    check_data: Annotated[
        Path | None, typer.Option(help="ONNX: folder of images to check the export on (up to 64 are used).")
    ] = None,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
) -> None:
    """Export a model: safetensors weights + JSON card (default), or ONNX with a dynamic batch axis.

    An ensemble (run folder or artefact) becomes an ensemble artefact: ``ensemble.json`` and one artefact per member
    under ``members/``; for ONNX, serve it with ``--backend onnx`` (each member is exported and checked on load).
    """
    from pneumolab.inference.ensemble import export_ensemble, is_ensemble
    from pneumolab.inference.export import export_artefact, export_onnx

    target = out or Path("artefacts") / model.resolve().name
    if model.is_dir() and is_ensemble(model):
        if target.suffix.lower() == ".onnx":
            raise SettingError(f"{model}: an ensemble exports as an artefact folder; run it with --backend onnx")
        from pneumolab.inference.loader import load_backend

        ensemble = load_backend(model)
        result = {"artefact": str(export_ensemble(ensemble, target, export_artefact, force=force))}
    elif target.suffix.lower() == ".onnx":
        images = None
        if check_data is not None:
            from pneumolab.inference.files import collect_image_paths
            from pneumolab.inference.pytorch import load_trained

            trained = load_trained(model)
            files, _ = collect_image_paths([str(check_data)])
            images = trained.load_images(files[:: max(1, len(files) // 64)][:64])
        result = export_onnx(model, target, check_images=images)
    else:
        result = {"artefact": str(export_artefact(model, target, force=force))}
    if json_out:
        _print_json(result)
    else:
        for key, value in result.items():
            stdout.print(f"{key}: {value}", markup=False)


@app.command("gate")
def gate_command(
    model: Annotated[Path, typer.Argument(help="An exported artefact folder, or `default` (the bundled model).")],
    data: Annotated[Path, typer.Option(help="The dataset the model was trained on (its train/ is read).")],
    out: Annotated[Path, typer.Option(help="Artefact folder to write (the weights are copied unchanged).")],
    keep: Annotated[float, typer.Option(help="Share of validation films the gate must answer.")] = 0.995,
    alpha: Annotated[
        float, typer.Option(help="Referral band: per-class share of films that may be answered wrongly.")
    ] = 0.02,
    force: ForceFlag = False,
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Fit an artefact's input gate (its training split) and referral band (its validation split); test is not read.

    A run folder gets both when it is evaluated (`pneumolab evaluate RUN`).
    """
    from pneumolab.evaluate.runner import gate_artefact

    card = gate_artefact(
        model, data=data, out=out, keep=keep, alpha=alpha, progress=not quiet and not json_out, force=force
    )
    summary = {"artefact": str(out), "gate": card["gate"], "referral": card["referral"]}
    if json_out:
        _print_json(summary)
        return
    low, high = card["referral"]["band"]
    stdout.print(
        f"{out}: gate limit {card['gate']['limit']:.3f} ({card['gate']['limit_set_on']}); "
        f"referral band {low:.3f}-{high:.3f} (alpha {alpha:g}, {card['referral']['fit_on']})",
        markup=False,
    )


@app.command("explain")
def explain_command(
    image: Annotated[Path, typer.Argument(help="An X-ray file (JPEG, PNG or DICOM).")],
    model: ModelOption = None,
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: <image name>.gradcam.png).")] = None,
    json_out: JsonFlag = False,
    no_gate: NoGateFlag = False,
    target_class: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Class whose score is explained (default: the predicted class; a binary model: PNEUMONIA).",
        ),
    ] = None,
) -> None:
    """Classify one X-ray and draw its Grad-CAM heatmap for one class beside the film.

    A file the input gate refuses (not a frontal chest X-ray) gets no heatmap: one line on stderr, exit status 2.
    """
    from pneumolab.api import load_model
    from pneumolab.inference.ensemble import is_ensemble

    if model is not None and model.is_dir() and is_ensemble(model):  # refused before its members load
        raise SettingError(f"{model}: Grad-CAM explains one network; explain an ensemble per member (--model MEMBER)")
    loaded = load_model(model, gate=not no_gate)
    target = out or Path(f"{image.stem}.gradcam.png")
    explanation = loaded.explain(image, target=target_class, out=target)
    decision = explanation.decision
    summary = {"file": str(image), **decision.fields(), "threshold": loaded.threshold, "heatmap": str(target),
               "target": explanation.target, "gate": loaded.gate_status}  # fmt: skip
    if json_out:
        _print_json(summary)
        return
    if loaded.gate_status != "on":
        _error_line(f"input gate: {loaded.gate_status}")
    verdict = decision.label if decision.status == "answered" else f"refer ({decision.reason})"
    stdout.print(f"{image}: {verdict} (P(pneumonia) {explanation.probability:.3f}); heatmap {target}", markup=False)


@app.command("serve")
def serve_command(
    model: ModelOption = None,
    host: Annotated[
        str,
        typer.Option(
            help="Interface to listen on (127.0.0.1: this machine only; any other needs --api-key or "
            "--allow-unauthenticated-remote)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require this X-API-Key header on /v1/* requests.", envvar="PNEUMOLAB_API_KEY"),
    ] = None,
    backend: BackendOption = "pytorch",
    max_batch: Annotated[
        int, typer.Option(help="Most concurrent /v1/predict images in one model call (1: no batching).", min=1)
    ] = 16,
    no_gate: NoGateFlag = False,
    allow_unauthenticated_remote: Annotated[
        bool,
        typer.Option(
            "--allow-unauthenticated-remote",
            help="Listen on a --host beyond this machine with no API key: anyone who can reach the port may use "
            "the model.",
        ),
    ] = False,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            help="A Host header name to answer (repeatable; '*.example.org' patterns). On 127.0.0.1 the machine's "
            "own names are always answered and others refused (DNS rebinding); beyond it, none given: any name."
        ),
    ] = None,
    root_path: Annotated[
        str, typer.Option(help="The path prefix a reverse proxy strips before forwarding (e.g. /pneumolab).")
    ] = "",
    ssl_keyfile: Annotated[
        Path | None, typer.Option(help="TLS private key (PEM): serve HTTPS, with --ssl-certfile.", exists=True)
    ] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate chain (PEM), with --ssl-keyfile.", exists=True)
    ] = None,
    metrics: Annotated[
        bool, typer.Option(help="Serve /metrics (Prometheus: counts, latencies, the drift watch) and record for it.")
    ] = True,
) -> None:
    """Serve a model over HTTP: an upload page at /, JSON API at /v1/predict and /v1/explain, docs at /docs
    (without an API key).

    See docs/guides/serving.md before listening beyond this machine (API key, allowed hosts, TLS, limits).

    Uploads that are not frontal chest X-rays get HTTP 422 with the input gate's reason (no label, no heatmap).
    """
    from pneumolab.serve import serve

    serve(
        model,
        host=host,
        port=port,
        api_key=api_key,
        backend=backend,
        max_batch=max_batch,
        gate=not no_gate,
        allow_unauthenticated_remote=allow_unauthenticated_remote,
        allowed_hosts=allowed_host or (),
        root_path=root_path,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        metrics=metrics,
    )


site_app = typer.Typer(help="A new site: check its films, calibrate on a few of its own.", no_args_is_help=True)
app.add_typer(site_app, name="site")


@site_app.command("check")
def site_check(
    model: Annotated[str, typer.Argument(help="An artefact folder or a bundled model's name (default).")],
    films: Annotated[list[Path], typer.Argument(help="The site's films: files or folders (unlabelled).")],
    reference_data: Annotated[
        Path | None,
        typer.Option(
            help="The dataset the model was trained on: its validation reference is computed once and "
            "cached (not needed for a model that stores one, as site calibrate's do)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for site-check.json and site-check.html.")] = None,
    backend: BackendOption = "pytorch",
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """How the site's films differ from the model's validation films, the prevalence they imply, and a verdict."""
    from pneumolab.site.check import check_site

    report = check_site(model, films, reference_data=reference_data, out=out, backend=backend,
                        progress=not quiet)  # fmt: skip
    if json_out:
        _print_json(report)
        return
    for name, facts in report["tests"].items():
        stdout.print(f"{name}: {facts['test']}, p = {facts['p_value']:.3g}{' (flagged)' if facts['flagged'] else ''}")
    shares = report["shares"]
    stdout.print(f"refused {shares['refused']:.1%}, referred {shares['referred']:.1%} of {report['n']} films")
    for name, facts in report["film_statistics"].items():  # medians, local against reference
        stdout.print(
            f"{name}: {facts['local'][1]:.3f} against {facts['reference'][1]:.3f}, KS p = {facts['p_value']:.2g}"
        )
    stdout.print(f"verdict: {report['verdict']['text']}")
    if out is not None:
        stdout.print(f"wrote {out / 'site-check.html'}")


@site_app.command("calibrate")
def site_calibrate(
    model: Annotated[str, typer.Argument(help="An artefact folder or a bundled model's name (default).")],
    data: Annotated[Path, typer.Option(help="Labelled local films: Kaggle class folders or a labels CSV.")],
    out: Annotated[Path, typer.Option(help="The new artefact's folder (must not exist).")],
    site: Annotated[str | None, typer.Option(help="The site's name, for the card (default: the data's name).")] = None,
    method: Annotated[str, typer.Option(help="logistic or temperature recalibration.")] = "logistic",
    alpha: Annotated[float | None, typer.Option(help="The band's per-class level (default: the card's).")] = None,
    confidence: Annotated[float, typer.Option(help="One-sided confidence of a sensitivity target's bound.")] = 0.9,
    prevalence: Annotated[
        float | None,
        typer.Option(
            help="The site's share of pneumonia, which the probabilities are moved to (default: estimated from "
            "--unlabelled, else the labelled films' share).",
            min=0,
            max=1,
        ),
    ] = None,
    unlabelled: Annotated[
        list[Path] | None,
        typer.Option(
            help="Unlabelled films of the site (files or folders; repeat): its prevalence is estimated by EM."
        ),
    ] = None,
    backend: BackendOption = "pytorch",
    json_out: JsonFlag = False,
    quiet: QuietFlag = False,
) -> None:
    """Refit the probabilities, threshold and referral band on a few labelled local films; write a new artefact."""
    from pneumolab.site.calibrate import calibrate_artefact

    card = calibrate_artefact(model, data=data, out=out, site=site, method=method, alpha=alpha,
                              prevalence=prevalence, unlabelled=unlabelled,
                              confidence=confidence, backend=backend, progress=not quiet)  # fmt: skip
    if json_out:
        _print_json(card["site"])
        return
    facts = card["site"]
    before, after = facts["local_figures"]["before"], facts["local_figures"]["after"]
    stdout.print(f"site {facts['name']}: {facts['counts']['NORMAL']} NORMAL, {facts['counts']['PNEUMONIA']} "
                 f"PNEUMONIA films ({facts['refused_by_gate']} refused by the gate)")  # fmt: skip
    stdout.print(f"prevalence {facts['prevalence']['value']:.1%}: {facts['prevalence']['how']}")
    for key in ("ece", "error_normal", "error_pneumonia", "coverage", "sensitivity", "specificity"):
        low, high = after["ci95"][key]
        stdout.print(f"{key}: {before[key]:.3f} before -> {after[key]:.3f} after [{low:.3f}, {high:.3f}] (cross-fit)")
    stdout.print(f"wrote {out}; serve it with: pneumolab serve --model {out}")


@app.command("listen")
def listen_command(
    dest: Annotated[
        str,
        typer.Option(
            help="Where results go: AE@HOST:PORT by C-STORE (e.g. ORTHANC@127.0.0.1:4242), or a DICOMweb root by "
            "STOW-RS (e.g. http://127.0.0.1:8042/dicom-web; credentials from PNEUMOLAB_DEST_TOKEN, or "
            "PNEUMOLAB_DEST_USERNAME and PNEUMOLAB_DEST_PASSWORD)."
        ),
    ],
    spool: Annotated[Path, typer.Option(help="Spool folder: received films, batches, results, journal.jsonl.")] = Path(
        "pacs-spool"
    ),
    ae_title: Annotated[str, typer.Option(help="This node's AE title.")] = "PNEUMOLAB",
    host: Annotated[
        str,
        typer.Option(
            help="Interface (127.0.0.1: this machine only; any other needs TLS with --tls-ca, or "
            "--allow-unprotected-remote)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="DICOM port.", min=0, max=65535)] = 11112,
    allow_ae: Annotated[
        list[str] | None, typer.Option(help="Calling AE titles allowed to associate (repeat; default: any).")
    ] = None,
    quiet_seconds: Annotated[float, typer.Option(help="A study is complete after this long without a film.")] = 5.0,
    restart_grace: Annotated[
        float,
        typer.Option(help="After a start, studies spooled before it wait this long for films their senders re-send."),
    ] = 30.0,
    max_instance_mb: Annotated[float, typer.Option(help="Larger instances are answered 'out of resources'.")] = 200,
    reserve_mb: Annotated[float, typer.Option(help="Free disk the spool never eats into.")] = 512,
    max_associations: Annotated[int, typer.Option(help="Concurrent associations.", min=1)] = 10,
    idle_timeout: Annotated[float, typer.Option(help="Seconds before a silent association is closed.")] = 60,
    retries: Annotated[int, typer.Option(help="Send retries before a study is marked failed.", min=0)] = 3,
    no_sc: Annotated[bool, typer.Option("--no-sc", help="Send the SR only (no Grad-CAM secondary capture).")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="CA that signs the client certificates required.")] = None,
    dest_ca: Annotated[
        Path | None, typer.Option(help="CAs to trust for an https:// --dest (PEM; default: the system's).")
    ] = None,
    allow_unprotected_remote: Annotated[
        bool,
        typer.Option(
            "--allow-unprotected-remote",
            help="Listen on a --host beyond this machine without TLS client certificates.",
        ),
    ] = False,
    model: ModelOption = None,
    backend: BackendOption = "pytorch",
    no_gate: NoGateFlag = False,
    threads: Annotated[int, typer.Option(help="Torch threads of the worker process.", min=1)] = 1,
) -> None:
    """Be a DICOM node: take chest films by C-STORE, and store a TID 1500 SR and a Grad-CAM secondary capture back
    into each study at --dest (C-STORE or STOW-RS) once the study has been quiet for --quiet-seconds (see
    docs/guides/pacs.md)."""
    import logging

    from pneumolab.pacs.listener import NodeSettings, run_node
    from pneumolab.pacs.sender import parse_destination
    from pneumolab.pacs.worker import WorkerSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per STOW-RS request otherwise
    settings = NodeSettings(
        spool=spool, dest=parse_destination(dest, ca_bundle=dest_ca), ae_title=ae_title, host=host, port=port,
        allowed_aes=tuple(allow_ae or ()), quiet_seconds=quiet_seconds, restart_grace=restart_grace,
        max_instance_bytes=int(max_instance_mb * 2**20), reserve_bytes=int(reserve_mb * 2**20),
        max_associations=max_associations, idle_timeout=idle_timeout, retries=retries, tls_cert=tls_cert,
        tls_key=tls_key, tls_ca=tls_ca, allow_unprotected_remote=allow_unprotected_remote,
        worker=WorkerSettings(
            model=str(model) if model else None, backend=backend, gate=not no_gate, with_sc=not no_sc, threads=threads
        ),
    )  # fmt: skip
    run_node(settings, on_ready=lambda listener: _error_line(f"listening as {ae_title} on {host}:{listener.port}"))


def main() -> None:
    """Console entry point: run the app, turning library errors into one line and exit status 2."""
    try:
        app()
    except PneumolabError as error:
        if "--debug" in sys.argv[1:]:
            raise
        _error_line(f"error: {error}")
        sys.exit(2)
    except KeyboardInterrupt:
        _error_line("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
