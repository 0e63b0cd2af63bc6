from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMMANDS = [
    [],
    ["data"],
    ["data", "check"],
    ["data", "prepare"],
    ["data", "split"],
    ["data", "download"],
    ["models"],
    ["train"],
    ["evaluate"],
    ["ensemble"],
    ["report"],
    ["run"],
    ["predict"],
    ["export"],
    ["explain"],
    ["serve"],
]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pneumolab.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


def test_version():
    assert run_cli("--version").stdout.startswith("pneumolab ")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["data", "check", "/nonexistent/folder"], "/nonexistent/folder: no such folder"),
        (["data", "split", "/nonexistent/folder"], "no such folder"),
        (["data", "download", "--source", "kagle"], "did you mean kaggle"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    result = run_cli(*args)
    assert result.returncode == 2
    assert fragment in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback():
    result = run_cli("--debug", "data", "check", "/nonexistent/folder")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_check_broken_folder_lists_each_bad_file(make_dataset):
    root = make_dataset(per_class=2)
    (root / "train" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    (root / "test" / "PNEUMONIA" / "text.jpeg").write_text("hello")
    result = run_cli("data", "check", str(root))
    assert result.returncode == 2
    bad_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(bad_lines) == 2
    assert any("empty.jpeg: empty file" in line for line in bad_lines)
    assert any("text.jpeg" in line for line in bad_lines)
    assert "train" in result.stdout and "2" in result.stdout


def test_split_command_writes_split_csv(make_dataset, tmp_path):
    root = make_dataset(per_class=20)
    out = tmp_path / "split.csv"
    result = run_cli("data", "split", str(root), "--out", str(out), "--val-fraction", "0.2", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["counts"]["val"]["NORMAL"] > 0 and summary["counts"]["test"]["PNEUMONIA"] == 20
    assert out.read_text().startswith("path,split,label,patient_id")


def test_check_json_on_the_shared_dataset(shared_data):
    result = run_cli("data", "check", str(shared_data), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # one JSON object and nothing else on stdout
    assert report["counts"]["train"] == {"NORMAL": 1341, "PNEUMONIA": 3875, "total": 5216}
    assert report["counts"]["test"] == {"NORMAL": 234, "PNEUMONIA": 390, "total": 624}
    assert report["unreadable"] == []
    assert report["exact_duplicates"]["n_groups"] >= 30
    # the data README: pneumonia ids collide across train and test (170 of 202); normal ids do not
    crossing = report["patients_across_splits"]["train&test"]
    assert crossing["n"] == 170
    assert all(p.startswith("person") for p in crossing["examples"])
