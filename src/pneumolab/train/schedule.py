"""The fine-tuning learning-rate schedule: linear warm-up to the base lr, then cosine annealing, stepped per batch."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

__all__ = ["warmup_cosine"]


def warmup_cosine(optimizer: Optimizer, *, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> LRScheduler:
    """Step ``s < warmup_steps`` runs at ``lr * (s + 1) / warmup_steps``; then cosine from ``lr`` at step
    ``warmup_steps`` down to ``lr * min_lr_ratio`` at `total_steps`.

    Built from torch's schedulers so that its state travels in ``state_dict()``. They update the lr step by step
    rather than from a closed form, so the values match the formula above to float rounding, not bit for bit.
    Every parameter group must start from the same lr (``eta_min`` is one number).
    """
    base_lr = optimizer.param_groups[0]["lr"]
    if any(group["lr"] != base_lr for group in optimizer.param_groups):
        raise ValueError("warmup_cosine needs one base lr for every parameter group")
    cosine_steps = max(1, total_steps - warmup_steps)
    if not warmup_steps:
        return CosineAnnealingLR(optimizer, T_max=cosine_steps, eta_min=base_lr * min_lr_ratio)
    # LinearLR reaches end_factor after total_iters steps: 1/w at step 0, 1 at step w - 1 (constant 1 when w is 1)
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=cosine_steps, eta_min=base_lr * min_lr_ratio)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
