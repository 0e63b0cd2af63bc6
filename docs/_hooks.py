"""mkdocs hooks: the reference pages that are generated from the code, so they cannot drift from it.

A page holds a marker line ``<!-- generated: NAME -->``; `on_page_markdown` replaces it with the text `GENERATORS`
builds from the package: the CLI (Typer's click tree), the config schema (the pydantic models), the run-folder and
card formats (`pneumolab.runs`, `pneumolab.inference.card`) and the HTTP API (the service's OpenAPI document).
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.MULTILINE)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def _doc(obj: Any) -> str:
    return " ".join((inspect.getdoc(obj) or "").split())


# --- the CLI ------------------------------------------------------------------------------------------------------


def _commands(group: Any, prefix: str) -> list[tuple[str, Any]]:
    """``(path, command)`` of every leaf command under `group` (Typer vendors its own click: duck typing here)."""
    found = []
    for name in sorted(group.commands):
        command = group.commands[name]
        path = f"{prefix} {name}"
        found += _commands(command, path) if hasattr(command, "commands") else [(path, command)]
    return found


def _param_row(param: Any, ctx: Any) -> str:
    if param.param_type_name == "argument":
        name = f"`{param.name.upper()}`" + ("..." if param.nargs == -1 else "")
        kind = "argument" + ("" if param.required else ", optional")
    else:
        name = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        kind = "flag" if getattr(param, "is_flag", False) else param.display_type(ctx).strip("<>")
    default = "" if param.default in (None, False, ()) or callable(param.default) else f"`{param.default}`"
    return f"| {name} | {_cell(kind)} | {default} | {_cell(getattr(param, 'help', '') or '')} |"


def cli_reference() -> str:
    """Every command of ``pneumolab``: usage, help and every option, from the Typer app."""
    import typer.main

    from pneumolab.cli import app

    root = typer.main.get_command(app)
    parts = []
    for path, command in _commands(root, "pneumolab"):
        ctx = command.make_context(path, [], resilient_parsing=True)
        params = [p for p in command.params if p.name != "help"]
        usage = " ".join(command.collect_usage_pieces(ctx))
        lines = [f"## `{path}`", "", f"`{path} {usage}`", "", _doc(command.callback) or _cell(command.help or ""), ""]
        if params:
            lines += ["| Argument / option | Type | Default | Help |", "|---|---|---|---|"]
            lines += [_param_row(p, ctx) for p in params]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# --- the config schema --------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("pneumolab.config.", "").replace("pneumolab.pipeline.", "")


def _model_table(model: Any, heading: str) -> str:
    lines = [f"### `{heading}`", "", _doc(model), "", "| Key | Type | Default | Description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else field.get_default(call_default_factory=False)
        if field.default_factory is not None:
            default = f"{field.default_factory.__name__}()"
        lines.append(
            f"| `{name}` | `{_cell(_type_name(field.annotation))}` | `{_cell(default)}` | "
            f"{_cell(field.description or '')} |"
        )
    return "\n".join(lines)


def config_reference() -> str:
    """The training config, the pipeline (study) config and the sweep space, from their pydantic models."""
    from pneumolab import config, pipeline
    from pneumolab.sweep import space

    sections = [
        ("## Training config (`pneumolab train --config`)", config.TrainConfig, [
            config.DataConfig, config.ModelConfig, config.AugmentSettings, config.OptimConfig, config.LossConfig]),
        ("## Pipeline config (`pneumolab run --config`, `cv`, `sweep`, `train --config STUDY --only NAME`)",
         pipeline.PipelineConfig, [pipeline.ModelRun, pipeline.EvaluateSettings, pipeline.EnsembleSettings]),
        ("## Sweep space (`pneumolab sweep --space`)", space.SweepSpace, [space.FloatRange, space.IntRange,
                                                                          space.Choice]),
    ]  # fmt: skip
    parts = []
    for heading, top, nested in sections:
        parts.append(heading)
        parts += [_model_table(m, m.__name__) for m in (top, *nested)]
    return "\n\n".join(parts)


# --- file formats -------------------------------------------------------------------------------------------------


def _description(obj: Any) -> str:
    """The docstring without its ``Args:`` / ``Returns:`` sections, on one line."""
    text = inspect.getdoc(obj) or ""
    return " ".join(re.split(r"\n\n(?:Args|Returns|Raises):", text)[0].split())


def run_folder_paths() -> list[tuple[str, str, str]]:
    """``(attribute, path, description)`` of every path `pneumolab.runs.RunDir` names, in its order: a property's
    path, or a method's pattern with each argument shown as ``{argument}``."""
    from pneumolab.runs import RunDir

    run = RunDir("RUN")
    rows = []
    for name, member in vars(RunDir).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property) and isinstance(getattr(run, name), Path):
            rows.append((name, getattr(run, name).as_posix(), _description(member.fget)))
        elif inspect.isfunction(member) and member.__annotations__.get("return") in ("Path", Path):
            arguments = list(inspect.signature(member).parameters)[1:]
            pattern = member(run, *(f"{{{a}}}" for a in arguments)).as_posix()
            rows.append((f"{name}({', '.join(arguments)})", pattern, _description(member)))
    return rows


def _columns(names: Any) -> str:
    return ", ".join(f"`{n}`" for n in names)


def run_folder_reference() -> str:
    """The files of a run folder and the columns of its tables, from `pneumolab.runs` (the one module that writer
    and readers share)."""
    from pneumolab import runs

    splits = ", ".join(f"`{s}`" for s in runs.EVALUATED_SPLITS)
    suffixes = " or ".join(f'`"{s}"`' for s in runs.VARIANT_SUFFIXES)
    lines = [
        _doc(runs.RunDir),
        "",
        "| Attribute of `RunDir` | Path | What it holds |",
        "|---|---|---|",
        *(f"| `{name}` | `{path}` | {_cell(text)} |" for name, path, text in run_folder_paths()),
        "",
        f"`{{split}}` is one of {splits} (`EVALUATED_SPLITS`); `{{suffix}}` is {suffixes} (`VARIANT_SUFFIXES`: the "
        "plain variant and the one with TTA views).",
        "",
        "### Columns of the tables",
        "",
        "| Table | Columns |",
        "|---|---|",
        f"| `predictions`, binary (`BINARY_PREDICTION_COLUMNS`) | {_columns(runs.BINARY_PREDICTION_COLUMNS)} |",
        f"| `predictions`, K classes (`class_prediction_columns`) | "
        f"{_columns(runs.class_prediction_columns(['<CLASS>']))}, one `p_` and one `logit_` column per class |",
        f"| `gate_scores` (`GATE_SCORE_COLUMNS`) | {_columns(runs.GATE_SCORE_COLUMNS)} |",
        "",
        _description(runs.class_prediction_columns),
    ]
    return "\n".join(lines)


def card_reference() -> str:
    """The card format: its number, the typed fields a reader takes, and every key of the bundled model's card."""
    import dataclasses

    from pneumolab.inference import card

    facts = json.loads((card.bundled_model_dir() / "card.json").read_text())
    lines = [
        f"Card format **{card.CARD_FORMAT}** (`pneumolab.inference.card.CARD_FORMAT`): a card of another format is "
        "refused on read, naming both numbers.",
        "",
        "### Fields a reader takes (`ModelCard`)",
        "",
        "| Field | Type |",
        "|---|---|",
        *(f"| `{f.name}` | `{_cell(f.type)}` |" for f in dataclasses.fields(card.ModelCard)),
        "",
        "### Keys of `card.json` (the bundled binary model's, as an example)",
        "",
        "| Key | Type | Example |",
        "|---|---|---|",
    ]
    for key, value in facts.items():
        example = json.dumps(value)
        example = example if len(example) <= 60 else example[:57] + "..."
        lines.append(f"| `{key}` | {type(value).__name__} | `{_cell(example)}` |")
    return "\n".join(lines)


# --- the HTTP API -------------------------------------------------------------------------------------------------


def http_reference() -> str:
    """Every route of ``pneumolab serve``, from the app's OpenAPI document (built around the bundled model)."""
    from pneumolab.inference.pytorch import load_trained
    from pneumolab.serve.app import create_app

    document = create_app(load_trained()).openapi()
    lines = [f"OpenAPI {document['openapi']}; {document['info']['title']} {document['info'].get('version', '')}.", ""]
    for path, methods in sorted(document["paths"].items()):
        for method, operation in methods.items():
            lines += [f"### `{method.upper()} {path}`", "", _cell(operation.get("summary", "")), ""]
            if operation.get("description"):
                lines += [" ".join(operation["description"].split()), ""]
            params = operation.get("parameters", [])
            if params:
                lines += ["| Parameter | In | Required | Description |", "|---|---|---|---|"]
                lines += [f"| `{p['name']}` | {p['in']} | {p.get('required', False)} | "
                          f"{_cell(p.get('description', ''))} |" for p in params]  # fmt: skip
                lines.append("")
            responses = operation["responses"].items()
            codes = ", ".join(f"{code} ({_cell(r.get('description', ''))})" for code, r in responses)
            lines += [f"Responses: {codes}.", ""]
    lines += ['??? note "The OpenAPI document"', "", "    ```json"]
    lines += ["    " + line for line in json.dumps(document, indent=2).splitlines()]
    lines += ["    ```"]
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[], str]] = {
    "cli": cli_reference,
    "config": config_reference,
    "run-folder": run_folder_reference,
    "card-format": card_reference,
    "http-api": http_reference,
}


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace each ``<!-- generated: NAME -->`` line with the generated text."""
    return MARKER.sub(lambda match: GENERATORS[match.group(1)](), markdown)
