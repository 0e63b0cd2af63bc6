"""The device and precision choice that training and inference share."""

from __future__ import annotations

import pytest
import torch

from pneumolab.errors import SettingError
from pneumolab.hardware import cpu_has_bf16, default_device, resolve_precision

CPU = torch.device("cpu")


def test_explicit_precisions_on_the_cpu():
    fp32 = resolve_precision("fp32", CPU)
    assert (fp32.name, fp32.dtype, fp32.needs_scaler) == ("fp32", None, False)
    bf16 = resolve_precision("bf16", CPU)
    assert (bf16.name, bf16.dtype, bf16.device_type, bf16.needs_scaler) == ("bf16", torch.bfloat16, "cpu", False)
    with pytest.raises(SettingError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(SettingError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", CPU)


def test_auto_on_the_cpu_follows_its_bf16_instructions():
    assert resolve_precision("auto", CPU).name == ("bf16" if cpu_has_bf16() else "fp32")


def test_autocast_computes_in_the_chosen_dtype():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with resolve_precision("bf16", CPU).autocast():
        assert (a @ b).dtype == torch.bfloat16
    with resolve_precision("fp32", CPU).autocast():
        assert (a @ b).dtype == torch.float32


def test_the_default_device_is_cuda_only_when_there_is_one():
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
