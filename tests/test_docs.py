"""The documentation stays true: its Python examples run and print what they show, every ``pneumolab ...`` line
parses against the CLI, and no page or docstring points outside the repository. (The strict site build itself is
``make docs-build``, which ``make test`` runs.)"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest
import typer.main

from pneumolab.cli import app

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "CHANGELOG.md", REPO / "BENCHMARKS.md", *(REPO / "docs").rglob("*.md")])
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.MULTILINE | re.DOTALL
)
NOT_EXECUTED = re.compile(r"<!-- not executed[^>]*-->\s*$")
WRAPPERS = {"time", "/usr/bin/time", "nice", "timeout", "-n", "-v", "-f"}
OUTSIDE = re.compile(r"\.\./shared|/work/(?:shared|notes|main)|\.\./\.\./")


def _blocks(page: Path) -> list[tuple[str, str, str, int, str]]:
    """``(info, body, text before, line, text after up to the next block)`` of every fenced block of a page."""
    text = page.read_text()
    matches = list(FENCE.finditer(text))
    ends = [m.start() for m in matches[1:]] + [len(text)] if matches else []
    return [(m["info"].strip(), m["body"], text[: m.start()], text.count("\n", 0, m.start()) + 1, text[m.end() : end])
            for m, end in zip(matches, ends, strict=True)]  # fmt: skip


def _python_examples() -> list[tuple[str, int, str, str | None]]:
    """``(page, line, code, expected output or None)`` of every executed Python block of the README and pages; a
    ``text`` block right after one is what it prints."""
    examples = []
    for page in [REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        blocks = _blocks(page)
        for index, (info, body, before, line, after) in enumerate(blocks):
            if info.split()[:1] != ["python"] or NOT_EXECUTED.search(before):
                continue
            following = blocks[index + 1] if index + 1 < len(blocks) else None
            shown = following is not None and following[0] == "text" and not after.strip()
            examples.append((str(page.relative_to(REPO)), line, body, following[1] if shown else None))
    return examples


EXAMPLES = _python_examples()


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory, request) -> Path:
    """A working folder where ``data/chest_xray`` is the dataset, as the examples assume."""
    folder = tmp_path_factory.mktemp("examples")
    shared = request.getfixturevalue("shared_data")
    (folder / "data").mkdir()
    (folder / "data" / "chest_xray").symlink_to(shared)
    return folder


def test_the_readme_is_short_and_its_examples_are_executed():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
    pages = {page for page, *_ in EXAMPLES}
    assert {"README.md", "docs/getting-started.md", "docs/guides/input-gate.md"} <= pages


@pytest.mark.parametrize(("page", "line", "code", "expected"), EXAMPLES, ids=[f"{p}:{n}" for p, n, *_ in EXAMPLES])
def test_python_examples_run_and_print_what_they_show(page, line, code, expected, example_dir, monkeypatch):
    monkeypatch.chdir(example_dir)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__doc_example__"})
    if expected is not None:
        assert printed.getvalue() == expected, f"{page}:{line}: the example prints something else"


def _command_lines() -> list[tuple[str, int, list[str]]]:
    """``(page, line, arguments after pneumolab)`` for every ``pneumolab`` command in a shell block of any page."""
    found = []
    for page in PAGES:
        for info, body, _, line, _ in _blocks(page):
            if info.split()[:1] not in ([], ["bash"], ["sh"], ["console"], ["shell"]):
                continue
            for offset, command in enumerate(body.replace("\\\n", " ").splitlines()):
                for segment in re.split(r"&&|\|\||;|\|", command.removeprefix("$ ")):
                    try:
                        words = shlex.split(segment, comments=True)
                    except ValueError:
                        continue
                    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in WRAPPERS or words[0].isdigit()
                                     or " " in words[0] or "%" in words[0]):  # fmt: skip
                        words = words[1:]
                    if words and Path(words[0]).name == "pneumolab":
                        found.append((str(page.relative_to(REPO)), line + offset + 1, words[1:]))
    return found


COMMANDS = _command_lines()


def test_every_pneumolab_line_in_the_docs_parses_against_the_cli():
    root = typer.main.get_command(app)
    assert len(COMMANDS) > 50
    failures = []
    for page, line, words in COMMANDS:
        command, name, rest = root, "pneumolab", list(words)
        while hasattr(command, "commands") and rest and rest[0] in command.commands:
            name, command, rest = f"{name} {rest[0]}", command.commands[rest[0]], rest[1:]
        if hasattr(command, "commands") or {"--help", "--version"} & set(rest):
            if rest and not rest[0].startswith("-"):
                failures.append(f"{page}:{line}: {name} has no command {rest[0]!r}")
            continue
        try:
            command.make_context(name, rest)
        except Exception as error:  # Typer vendors click: its usage errors share no importable base here
            if "does not exist" in str(error):  # a file this machine lacks, not a wrong command
                continue
            failures.append(f"{page}:{line}: {name} {shlex.join(rest)}: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)


def test_no_page_or_docstring_points_outside_the_repository():
    texts = [*PAGES, *(REPO / "src" / "pneumolab").rglob("*.py"), *(REPO / "configs").glob("*.yaml"),
             *(REPO / "src" / "pneumolab" / "bundled").glob("*/*.md"), REPO / "mkdocs.yml"]  # fmt: skip
    failures = []
    for file in texts:
        text = file.read_text()
        failures += [f"{file.relative_to(REPO)}: {m.group(0)!r}" for m in OUTSIDE.finditer(text)]
        if file.suffix == ".md":
            for target in re.findall(r"\]\(([^)#\s]+)", text):
                if "://" in target or target.startswith("mailto:"):
                    continue
                resolved = (file.parent / target).resolve()
                if not resolved.is_relative_to(REPO):
                    failures.append(f"{file.relative_to(REPO)}: link {target} leaves the repository")
                elif not resolved.exists():
                    failures.append(f"{file.relative_to(REPO)}: link {target} points at nothing")
    assert not failures, "\n".join(failures)


def test_each_generated_reference_covers_its_source():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    cli = hooks.cli_reference()
    root = typer.main.get_command(app)
    for path, command in hooks._commands(root, "pneumolab"):
        assert f"## `{path}`" in cli
        for param in command.params:
            if param.param_type_name == "option" and param.name != "help":
                assert f"`{param.opts[0]}`" in cli.split(f"## `{path}`", 1)[1].split("\n## ", 1)[0], (path, param.name)
    config = hooks.config_reference()
    assert "`model_names`" not in config and "### `TrainConfig`" in config and "`target_sensitivity`" in config
    assert "`operating_point`" in hooks.run_folder_reference()
    assert "`weights_sha256`" in hooks.card_reference()
