"""Freezing policies for transfer learning, and keeping frozen BatchNorm layers frozen."""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pneumolab.errors import SettingError, did_you_mean
from pneumolab.models._classifier import Classifier

__all__ = ["FREEZE_POLICIES", "apply_freeze", "count_parameters", "set_frozen_batchnorm_eval"]

FREEZE_POLICIES: tuple[str, ...] = ("full", "plan", "linear", "gradual")
"""Policy names accepted by `apply_freeze`."""

HEAD_GROUP = "head"


def _group_of(model: Classifier, param_name: str) -> str:
    if param_name.startswith(HEAD_GROUP + "."):
        return HEAD_GROUP
    for group in model.spec.freeze_groups:
        if group.matches(param_name):
            return group.name
    # Every parameter must belong to a group (the registry tests check it); one that does not is a spec bug.
    raise RuntimeError(f"{model.spec.name}: parameter {param_name} is in no freeze group")


def apply_freeze(model: Classifier, policy: str, *, epoch: int = 0, gradual_every: int = 1) -> list[str]:
    """Set `requires_grad` by parameter group; call again (e.g. each epoch for ``"gradual"``) to change it.

    Policies:
        ``"full"``: everything trains (fine-tuning; the only sensible choice for random weights).
        ``"plan"``: the research plan's: the last stage at 1/32 resolution and the head (ResNet ``layer4``,
        DenseNet ``denseblock4`` and ``norm5``, EfficientNet/MobileNet/Lite stages 6-7 and the final 1 x 1 conv;
        see each spec's `plan_groups`).
        ``"linear"``: only the head (linear probe of the pretrained features).
        ``"gradual"``: the head at epoch 0, then one more group from the top every `gradual_every` epochs
        until everything trains (ULMFiT-style gradual unfreezing).

    Args:
        model: The model; its parameters' `requires_grad` is set in place.
        policy: One of `FREEZE_POLICIES`.
        epoch: Current epoch, counted from 0 (``"gradual"`` only).
        gradual_every: Epochs between two unfreezing steps (``"gradual"`` only).

    Returns:
        Names of the trainable groups, stem side first, ``"head"`` last.

    Raises:
        UnknownNameError: Unknown policy.
        SettingError: Negative `epoch` or `gradual_every` below 1.
    """
    groups = [*model.spec.group_names, HEAD_GROUP]
    if policy == "full":
        trainable = groups
    elif policy == "plan":
        trainable = [*model.spec.plan_groups, HEAD_GROUP]
    elif policy == "linear":
        trainable = [HEAD_GROUP]
    elif policy == "gradual":
        if epoch < 0:
            raise SettingError(f"epoch must be at least 0, got {epoch}")
        if gradual_every < 1:
            raise SettingError(f"gradual_every must be at least 1, got {gradual_every}")
        trainable = groups[-min(1 + epoch // gradual_every, len(groups)) :]
    else:
        raise did_you_mean("freeze policy", policy, FREEZE_POLICIES)
    wanted = set(trainable)
    for name, param in model.named_parameters():
        param.requires_grad_(_group_of(model, name) in wanted)
    return trainable


def set_frozen_batchnorm_eval(model: nn.Module) -> int:
    """Put every BatchNorm layer whose affine parameters are all frozen into eval mode; call after `model.train()`.

    Freezing parameters does not freeze a BatchNorm layer: in training mode it still normalises with the batch's
    statistics and overwrites its pretrained running mean and variance with those of small X-ray batches, so the
    frozen layers after it see shifted inputs and evaluation uses statistics that training never matched. In
    eval mode the layer uses, and keeps, its pretrained statistics. Layers without affine parameters are left
    alone (there is nothing to tell whether they are meant to be frozen).

    Returns:
        How many BatchNorm layers were put into eval mode.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
                count += 1
    return count


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) numbers of parameter elements."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
