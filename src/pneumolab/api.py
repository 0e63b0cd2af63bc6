"""The public Python API: load a model and predict, explain, evaluate, train and run, as the CLI does.

The functions that evaluate and train are `evaluate_model` and `train_model`: ``pneumolab.evaluate`` and
``pneumolab.train`` are the subpackages that do the work.

Every ``pneumolab`` command that has a counterpart here is a thin wrapper over it, so a Python caller gets the same
decisions as the command line: the input gate (DICOM metadata rules, then the content check), the referral band and
the label, for the same files. The package root re-exports these names lazily, so ``import pneumolab`` stays cheap
and the heavy libraries load on first use.

Example:
    >>> import pneumolab
    >>> model = pneumolab.load_model("default")  # doctest: +SKIP
    >>> model.predict(["film.jpeg"])[0].label  # doctest: +SKIP
    'PNEUMONIA'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pneumolab.errors import ImageReadError, SettingError

if TYPE_CHECKING:
    import torch

    from pneumolab.config import TrainConfig
    from pneumolab.inference.explain import Explanation
    from pneumolab.inference.steps import InferenceModel

__all__ = [
    "Model",
    "Prediction",
    "Predictions",
    "evaluate_model",
    "list_bundled",
    "list_models",
    "list_recipes",
    "load_model",
    "run",
    "train_model",
    "training_config",
]

PathLike = str | os.PathLike[str]
ERROR_MODES = ("raise", "collect")


@dataclass(frozen=True)
class Prediction:
    """One input's decision, with the same fields as a row of ``pneumolab predict --json``.

    Attributes:
        file: The file's path, or ``<array N>`` for the N-th array given.
        status: ``answered``, ``refer`` (label kept; send it to a radiologist) or ``refused`` (not a frontal
            chest X-ray: no label, no probability).
        label: The predicted class; empty when refused.
        probability: P(not the first class), i.e. P(PNEUMONIA) for the binary and the three-class models alike;
            None when refused.
        threshold: The model's decision threshold on `probability` (binary models; K-class models decide by
            argmax).
        probabilities: Every class's calibrated probability; None when refused.
        reason: Why the film was refused or referred; empty when answered.
        gate_score: The content gate's score (None when the model has no gate, or the gate is off).
        notes: Odd but readable things about the file (a flat intensity range, say); empty when none.
    """

    file: str
    status: str
    label: str
    probability: float | None
    threshold: float
    probabilities: dict[str, float] | None
    reason: str
    gate_score: float | None
    notes: str

    def as_dict(self) -> dict[str, Any]:
        """The prediction as the CLI's JSON row."""
        return asdict(self)


class Predictions(list[Prediction]):
    """The predictions of `Model.predict`, in input order, with the inputs that could not be read.

    Attributes:
        errors: ``(file, reason)`` of each input that could not be read (filled with ``errors="collect"``).
    """

    def __init__(self, rows: Sequence[Prediction] = (), errors: Sequence[tuple[str, str]] = ()) -> None:
        """Hold `rows` and `errors`."""
        super().__init__(rows)
        self.errors: list[tuple[str, str]] = list(errors)


class Model:
    """A loaded model on one backend, as `load_model` returns it: predict, explain, and what its card says.

    Attributes:
        inference_model: The backend object underneath (a `pneumolab.inference.steps.InferenceModel`).
    """

    def __init__(self, inference_model: InferenceModel) -> None:
        """Wrap a loaded backend model (use `load_model` rather than this)."""
        self.inference_model = inference_model

    def __repr__(self) -> str:
        """A short description: architecture, classes, backend and where it came from."""
        return f"Model({self.name!r}, classes={list(self.classes)}, backend={self.backend!r}, source={self.source!r})"

    @property
    def name(self) -> str:
        """The architecture (e.g. ``mobilenet_v2``), or ``ensemble``."""
        return self.inference_model.name

    @property
    def classes(self) -> tuple[str, ...]:
        """The model's classes in output order (its card's; K >= 2)."""
        return tuple(self.inference_model.classes)

    @property
    def threshold(self) -> float:
        """The decision threshold on P(not the first class), fit on validation."""
        return float(self.inference_model.threshold)

    @property
    def backend(self) -> str:
        """What runs the network: ``pytorch`` or ``onnx``."""
        return self.inference_model.backend

    @property
    def source(self) -> str:
        """Where the model was loaded from."""
        return str(self.inference_model.source)

    @property
    def gate_enabled(self) -> bool:
        """Whether the input gate and referral band are on (False: research use, every input gets a label)."""
        return self.inference_model.gate_enabled

    @gate_enabled.setter
    def gate_enabled(self, value: bool) -> None:
        self.inference_model.gate_enabled = bool(value)

    @property
    def gate_status(self) -> str:
        """What the input gate does for this model: ``on``, metadata only, or off (as every CLI output says)."""
        return self.inference_model.gate_status

    def card(self) -> dict[str, Any]:
        """The model's facts (architecture, preprocessing, classes, operating point, gate, band) with its backend."""
        return {**self.inference_model.card(), "backend": self.backend}

    def predict(
        self,
        inputs: PathLike | np.ndarray | Sequence[PathLike] | Sequence[np.ndarray],
        *,
        batch_size: int = 32,
        errors: str = "raise",
    ) -> Predictions:
        """Decide films: the input gate, the referral band and the label, exactly as ``pneumolab predict``.

        Files are read once with their metadata, so a DICOM's Modality, BodyPartExamined, ViewPosition and frame
        count are checked before the content gate (a CT slice is refused by its modality). Arrays carry no
        metadata: only the content gate applies to them.

        Args:
            inputs: A file, folder (searched recursively) or glob pattern, or a sequence of them; or a 2-D
                grayscale array (H x W), a stack (N x H x W), or a sequence of 2-D arrays. Arrays are uint8
                (0-255), another integer type (scaled by its range), or float in [0, 1]; any size.
            batch_size: Films per forward pass.
            errors: ``raise``: an input that cannot be read (or matches nothing) raises `ImageReadError` naming
                it; ``collect``: it goes to the result's ``errors`` and the rest are decided.

        Returns:
            One `Prediction` per readable film, in input order (folders in sorted order).

        Raises:
            ImageReadError: With ``errors="raise"``, the first input that could not be read.
            SettingError: `errors` is not ``raise`` or ``collect``, or an array has the wrong shape or range.
        """
        if errors not in ERROR_MODES:
            raise SettingError(f"errors: must be one of {', '.join(ERROR_MODES)}, got {errors!r}")
        arrays = _as_arrays(inputs)
        if arrays is not None:
            return self._predict_arrays(arrays, batch_size)
        from pneumolab.inference.files import collect_image_paths, predict_files

        single = isinstance(inputs, str | os.PathLike)
        paths, problems = collect_image_paths([inputs] if single else list(inputs))  # type: ignore[list-item]
        if problems and errors == "raise":
            raise ImageReadError(*problems[0])
        rows, failures = predict_files(self.inference_model, paths, batch_size=batch_size)
        if failures and errors == "raise":
            raise ImageReadError(*failures[0])
        return Predictions([_prediction(row) for row in rows], [*problems, *failures])

    def _predict_arrays(self, arrays: list[np.ndarray], batch_size: int) -> Predictions:
        from pneumolab.data.io import to_square_uint8

        size = self.inference_model.cache_size
        images = np.stack([to_square_uint8(_unit_range(a, i), size) for i, a in enumerate(arrays)])
        rows = []
        for start in range(0, len(images), batch_size):
            for offset, decision in enumerate(self.inference_model.assess(images[start : start + batch_size])):
                fields = decision.fields()
                rows.append(
                    _prediction(
                        {"file": f"<array {start + offset}>", "threshold": self.threshold, **fields, "notes": ""}
                    )
                )
        return Predictions(rows)

    def explain(self, image: PathLike, *, target: str | None = None, out: PathLike | None = None) -> Explanation:
        """Gate and classify one film and draw the Grad-CAM heatmap of one class beside it.

        Args:
            image: An X-ray file (JPEG, PNG or DICOM).
            target: The class whose score is explained (default: the predicted class; a binary model: PNEUMONIA).
            out: Where to write the PNG (film and overlay side by side); nothing is written when None.

        Returns:
            The `pneumolab.inference.explain.Explanation`: heatmap, decision, target class and PNG bytes.

        Raises:
            InputRefusedError: The input gate refused the file (no heatmap for what is not a chest X-ray).
            SettingError: The model is an ensemble (explain one member) or has no PyTorch network.
        """
        from pneumolab.inference.explain import explain_image

        explainer = self.inference_model.explainer
        if explainer is None:
            raise SettingError(f"{self.source}: Grad-CAM explains one network; explain an ensemble per member")
        explainer.gate_enabled = self.gate_enabled
        explanation = explain_image(explainer, image, target=target)
        if out is not None:
            from pneumolab.fsutil import atomic_path

            with atomic_path(Path(out)) as tmp:
                tmp.write_bytes(explanation.png)
        return explanation


def _as_arrays(inputs: Any) -> list[np.ndarray] | None:
    """The inputs as a list of 2-D arrays, or None when they are paths."""
    if isinstance(inputs, np.ndarray):
        if inputs.ndim == 2:
            return [inputs]
        if inputs.ndim == 3:
            return list(inputs)
        raise SettingError(f"an image array must be H x W or N x H x W, got shape {inputs.shape}")
    if isinstance(inputs, str | os.PathLike):
        return None
    items = list(inputs)
    kinds = {isinstance(item, np.ndarray) for item in items}
    if kinds == {True}:
        return [np.asarray(item) for item in items]
    if True in kinds:
        raise SettingError("inputs: give either arrays or paths, not both in one call")
    return None


def _unit_range(array: np.ndarray, index: int) -> np.ndarray:
    """One grayscale array as float32 in [0, 1] (uint8 and other integers by their type's range)."""
    if array.ndim != 2:
        raise SettingError(f"<array {index}>: an image must be 2-D grayscale (H x W), got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        return (array.astype(np.float32) - max(info.min, 0)) / float(info.max - max(info.min, 0))
    values = array.astype(np.float32)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise SettingError(f"<array {index}>: float pixels must be finite and in [0, 1]")
    return values


def _prediction(row: Mapping[str, Any]) -> Prediction:
    return Prediction(
        file=str(row["file"]),
        status=row["status"],
        label=row["label"],
        probability=row["probability"],
        threshold=float(row["threshold"]),
        probabilities=row.get("probabilities"),
        reason=row.get("reason", ""),
        gate_score=row.get("gate_score"),
        notes=row.get("notes", ""),
    )


def load_model(
    name_or_path: PathLike | None = None,
    *,
    backend: str = "pytorch",
    device: str | torch.device | None = None,
    gate: bool = True,
) -> Model:
    """Load a model for inference: a bundled model by name, a run folder, an artefact, an ensemble or an ONNX file.

    Args:
        name_or_path: A bundled model's name or alias (`list_bundled`; None: ``default``), a trained and
            evaluated run folder, an exported artefact folder (``model.safetensors`` + ``card.json``), an ensemble
            (run folder or artefact), or an ``.onnx`` file beside its card (with ``backend="onnx"``). A bare name
            that is both a bundled model's and a folder's here is refused, naming both.
        backend: ``pytorch``, or ``onnx`` (onnxruntime on the CPU; a run, artefact or bundled model is exported
            on the fly and checked against PyTorch).
        device: The PyTorch device (``"cpu"``, ``"cuda"``; default: the GPU when there is one).
        gate: False turns the input gate and referral band off (research use: every input gets a label).

    Returns:
        The `Model`.

    Raises:
        ArtefactError: The path holds no model, its files do not match its card, or the name is ambiguous.
        UnknownNameError: `backend` is not ``pytorch`` or ``onnx``.
    """
    import torch

    from pneumolab.inference.card import bundled_path
    from pneumolab.inference.loader import load_backend

    # a bundled name resolves (or is refused as ambiguous) before any folder of that name is looked at
    model = bundled_path(name_or_path) or name_or_path
    loaded = load_backend(model, backend, device=torch.device(device) if device is not None else None)
    loaded.gate_enabled = gate
    return Model(loaded)


def evaluate_model(
    model: PathLike | Model,
    data: PathLike | None = None,
    *,
    split: str = "test",
    tta: bool = False,
    tta_views: str = "cxr",
    threshold: str = "balanced_accuracy",
    target_sensitivity: float | None = None,
    choose_by: str = "log_loss",
    resamples: int = 2000,
    force: bool = False,
    gate: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate a model on a dataset split with 95 % bootstrap intervals, as ``pneumolab evaluate``.

    A run folder is evaluated on validation and test (its operating point, input gate and referral band fit on
    validation and training films; files written into the run, reused when up to date). An exported artefact or
    a bundled model is evaluated with its card's operating point, gate and band, nothing fit; its metrics then
    hold ``selective``: how many films the gate refused and the band referred, and the accuracy of the rest.

    Args:
        model: A run folder, an artefact, a bundled model's name, or a `Model` loaded from one of them.
        data: The dataset folder (a run's own by default; required for an artefact).
        split: ``val`` or ``test``.
        tta: A run: return the test-time-augmentation variant's metrics instead of the plain one's.
        tta_views: A run: the TTA preset (``plan``, ``cxr``) or comma-separated views.
        threshold: A run: how the threshold is fit on validation (``balanced_accuracy``, ``youden``, ``f1``,
            ``target_sensitivity``, ``fixed``).
        target_sensitivity: A run: the validation sensitivity the threshold keeps (implies
            ``threshold="target_sensitivity"``).
        choose_by: A run: the validation metric that chooses TTA or plain (``log_loss``, ``brier``, ``roc_auc``).
        resamples: Bootstrap resamples of the intervals.
        force: A run: evaluate again even when its files are up to date.
        gate: An artefact: report what the input gate and band do (``selective``).
        progress: Show progress bars on stderr.

    Returns:
        The split's metrics (keys such as ``accuracy``, ``roc_auc``, ``confusion_matrix``, ``ci95``).

    Raises:
        SettingError: A bad split, or an artefact without `data`.
    """
    from pneumolab.evaluate.runner import evaluate_artefact, evaluate_run
    from pneumolab.inference.card import bundled_path

    if split not in ("val", "test"):
        raise SettingError(f"--split must be val or test, not {split!r}")
    target = model.source if isinstance(model, Model) else model
    bundled = bundled_path(target)
    if bundled is not None or (Path(target) / "card.json").is_file():
        if data is None:
            raise SettingError(f"{target}: an exported model names no dataset; pass --data DIR")
        return evaluate_artefact(
            bundled or target, data=data, split=split, n_resamples=resamples, gate=gate, progress=progress
        )
    if target_sensitivity is not None and threshold == "balanced_accuracy":
        threshold = "target_sensitivity"
    results = evaluate_run(
        target,
        data=data,
        tta=tta_views,
        threshold_method=threshold,
        target_sensitivity=target_sensitivity,
        choose_by=choose_by,
        n_resamples=resamples,
        force=force,
        progress=progress,
    )
    return results[f"{split}_tta" if tta else split]


def training_config(
    config: PathLike | TrainConfig | None = None,
    *,
    only: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """The training config `train` uses: a training YAML, or one model of a pipeline config (a study), plus flags.

    Args:
        config: A training config file, a pipeline config (file or shipped recipe name, with ``models:``), a
            `TrainConfig`, or None (the defaults).
        only: The model of a pipeline config to train (may be left out when it has one model).
        overrides: Dotted keys to set (``{"epochs": 2, "model.name": "resnet18"}``); None values are ignored.

    Returns:
        The checked `pneumolab.config.TrainConfig`.

    Raises:
        SettingError: `only` with a training config, a pipeline config with several models and no `only`, or a
            setting the schema refuses.
        UnknownNameError: `only` names no model of the pipeline config.
    """
    import yaml

    from pneumolab.config import TrainConfig, apply_overrides, load_config
    from pneumolab.errors import did_you_mean
    from pneumolab.pipeline import load_pipeline_config, model_train_config
    from pneumolab.recipes import recipe_path

    if isinstance(config, TrainConfig) or config is None:
        if only is not None:
            raise SettingError("--only names a model of a pipeline config; pass --config STUDY.yaml with it")
        settings = config or TrainConfig()
    else:
        path = recipe_path(config)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as error:
            raise SettingError(f"{path}: not a readable YAML config ({error})") from None
        if isinstance(raw, dict) and "models" in raw:  # a pipeline config: one of its models, under its data
            pipeline = load_pipeline_config(path)
            names = [m.name for m in pipeline.models]
            if only is None and len(names) > 1:
                raise SettingError(
                    f"{path}: a pipeline config of {len(names)} models; pick one with --only NAME ({', '.join(names)})"
                )
            chosen = only or names[0]
            if chosen not in names:
                raise did_you_mean(f"model of {path}", chosen, names)
            settings = model_train_config(next(m for m in pipeline.models if m.name == chosen), pipeline.data)
        elif only is not None:
            raise SettingError(f"{path}: a training config has no models to pick with --only")
        else:
            settings = load_config(path)
    return apply_overrides(settings, dict(overrides or {}))


def train_model(
    config: PathLike | TrainConfig | None = None,
    *,
    only: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: PathLike | None = None,
    resume: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train one model into a run folder, as ``pneumolab train``.

    Args:
        config: A training config, or a pipeline config with `only` (see `training_config`).
        only: The model of a pipeline config to train.
        overrides: Dotted keys to set, e.g. ``{"data.root": "data/chest_xray", "epochs": 3}``.
        out: The run folder (default: ``runs/<model>-<time>``); an existing run is refused unless `resume`.
        resume: Continue the run in `out` after its last finished epoch.
        progress: Show progress on stderr.

    Returns:
        The training summary: ``run``, ``best_epoch``, its metric, ``wall_seconds``.

    Raises:
        SettingError: `resume` without `out`, or a setting the schema refuses.
    """
    from pneumolab.train.api import default_run_dir
    from pneumolab.train.api import train as train_run

    settings = training_config(config, only=only, overrides=overrides)
    if resume and out is None:
        raise SettingError("--resume needs --out RUN (the run folder to continue)")
    return train_run(settings, out or default_run_dir(settings), resume=resume, progress=progress)


def run(
    config: PathLike | None = None,
    *,
    data: PathLike | None = None,
    out: PathLike | None = None,
    only: Sequence[str] | None = None,
    study: str | None = None,
    storage: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The main job, as ``pneumolab run``: prepare, train each model, evaluate, ensemble, report.

    Args:
        config: A pipeline config file or a shipped recipe's name (`list_recipes`; None: the default recipe).
        data: The dataset folder (default: the config's, else ``data/chest_xray``).
        out: The output folder (default: ``runs/<recipe name>``).
        only: Train and evaluate only these models; others already evaluated in `out` join the ensemble and report.
        study: An Optuna study name: spread the models over every worker started with the same study and storage.
        storage: The study's storage (a journal file, default ``OUT/study.journal``, or an RDB URL).
        progress: Show progress on stderr.

    Returns:
        The summary: the report's path, every run, wall seconds.
    """
    from pneumolab.pipeline import load_pipeline_config, run_pipeline
    from pneumolab.recipes import recipe_path

    path = recipe_path(config)
    pipeline = load_pipeline_config(path)
    out = Path(out) if out is not None else Path("runs") / path.stem
    only = list(only) if only else None
    if study is not None:
        from pneumolab.sweep.spread import spread_pipeline

        spread_pipeline(pipeline, out, study=study, storage=storage, data=data, only=only, progress=progress)
    return run_pipeline(pipeline, out, data=data, only=only, progress=progress)


def list_models(pattern: str = "*") -> list[dict[str, Any]]:
    """The architectures that can be trained, with their input size and whether ImageNet weights are here.

    Args:
        pattern: A shell-style filter, e.g. ``"efficientnet_*"``.

    Returns:
        One dict per architecture: ``name``, ``input_size``, ``feature_dim``, ``imagenet_here``,
        ``imagenet_source``.
    """
    from pneumolab.models import imagenet_weights_available, model_spec
    from pneumolab.models import list_models as registered

    rows = []
    for name in registered(pattern):
        spec = model_spec(name)
        rows.append(
            {
                "name": name,
                "input_size": spec.input_size,
                "feature_dim": spec.feature_dim,
                "imagenet_here": imagenet_weights_available(name),
                "imagenet_source": spec.imagenet_source,
            }
        )
    return rows


def list_bundled() -> list[dict[str, Any]]:
    """The models shipped inside the package, by their descriptive names.

    Returns:
        One dict per bundled model: ``name``, ``aliases``, ``summary``, ``path`` (its folder: weights, card,
        gate, ``recipe.yaml``, ``MODEL_CARD.md``), ``architecture`` and ``classes``.
    """
    import json

    from pneumolab.inference.card import BUNDLED, bundled_model_dir, bundled_names

    installed = set(bundled_names())
    rows = []
    for entry in BUNDLED:
        if entry.name not in installed:
            continue
        folder = bundled_model_dir(entry.name)
        card = json.loads((folder / "card.json").read_text())
        rows.append(
            {
                "name": entry.name,
                "aliases": list(entry.aliases),
                "summary": entry.summary,
                "path": str(folder),
                "architecture": card["architecture"],
                "classes": card["classes"],
            }
        )
    return rows


def list_recipes() -> list[str]:
    """The names of the pipeline configs shipped with the package (``--config NAME`` takes them)."""
    from pneumolab.recipes import list_recipes as shipped

    return shipped()
