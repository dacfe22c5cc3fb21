"""Schedules computed outside the module and passed in: the EMA momentum and the learning rate."""

from __future__ import annotations

import math


def momentum_at(base: float, progress: float, schedule: str) -> float:
    """EMA momentum: constant, or cosine from `base` to 1 over training (BYOL)."""
    if schedule == "const":
        return base
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier: linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))
