from __future__ import annotations

import pytest

from pneumolab.config import TrainConfig, apply_overrides, dump_config, load_config
from pneumolab.errors import SettingError
from pneumolab.pipeline import load_pipeline_config


def test_defaults_roundtrip_through_yaml(tmp_path):
    config = apply_overrides(TrainConfig(), {"model.name": "resnet50", "epochs": 3, "data.root": "/data"})
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    again = load_config(path)
    assert again == config
    assert again.model.name == "resnet50" and again.epochs == 3 and str(again.data.root) == "/data"


def test_none_overrides_are_ignored():
    assert apply_overrides(TrainConfig(), {"epochs": None, "optim.lr": None}) == TrainConfig()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("optim:\n  lrr: 0.1\n", "optim.lrr: Extra inputs are not permitted"),
        ("epochs: 0\n", "epochs: Input should be greater than or equal to 1"),
        ("freeze: everything\n", "freeze: Input should be 'full', 'plan', 'linear' or 'gradual'"),
        ("- a list\n", "must be a mapping"),
        ("epochs: [\n", "not valid YAML"),
        ("model:\n  name: resnet5\n", "model.name: unknown model 'resnet5'; did you mean resnet50"),
        ("augment:\n  preset: plann\n", "augment.preset: unknown augmentation preset 'plann'; did you mean plan"),
        ("data:\n  task: kinds\n", "data.task: unknown task 'kinds'; did you mean kind"),
    ],
)
def test_bad_configs_are_one_line_errors(tmp_path, text, fragment):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SettingError) as caught:
        load_config(path)
    assert fragment in str(caught.value)
    assert str(path) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SettingError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_bad_override_is_refused():
    with pytest.raises(SettingError, match="batch_size"):
        apply_overrides(TrainConfig(), {"batch_size": -4})


_PIPELINE = """
models:
  - name: a
    train: {model: {name: resnet18, weights: none}}
  - name: b
    train: {model: {name: mobilenet_v2, weights: none}}
"""


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("evaluate: {tta: cxrr}\n", "evaluate: unknown TTA view 'cxrr'; did you mean cxr"),
        ("evaluate: {threshold: youdn}\n", "evaluate: unknown threshold method 'youdn'; did you mean youden"),
        ("evaluate: {threshold: target_sensitivity}\n", "target_sensitivity must be within (0, 1)"),
        ("ensemble: {method: stackin}\n", "ensemble.method: unknown ensemble method 'stackin'"),
        ("ensemble: {members: [a, c]}\n", "ensemble.members: ['c'] are not models of this config (a, b)"),
        ("models:\n  - name: a\n  - name: a\n", "models: ['a'] named more than once"),
    ],
)
def test_pipeline_settings_are_checked_when_the_config_is_read(tmp_path, extra, fragment):
    path = tmp_path / "pipeline.yaml"
    path.write_text(extra if extra.startswith("models") else _PIPELINE + extra)
    with pytest.raises(SettingError) as caught:
        load_pipeline_config(path)  # before any data is read or model trained
    assert fragment in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)
