"""Per-iteration schedules (learning rate, weight decay, EMA momentum, teacher temperature) as arrays."""

from __future__ import annotations

import numpy as np


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Return ``total_steps`` values: linear warmup from ``warmup_start`` to ``start``, then cosine to ``end``.

    The cosine part reaches ``end`` exactly at the last step.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(warmup_start, start, warmup_steps, endpoint=False) if warmup_steps else np.array([])

    cosine_steps = total_steps - warmup_steps
    if cosine_steps == 1:
        cosine = np.array([end])
    else:
        progress = np.arange(cosine_steps) / max(cosine_steps - 1, 1)
        cosine = end + 0.5 * (start - end) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine])


def teacher_temperature_schedule(start: float, end: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Return the teacher temperature per step: linear from ``start`` to ``end`` over the warmup, then flat.

    A low temperature at the start sharpens the teacher while its outputs are still close to uniform.
    """
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(start, end, warmup_steps) if warmup_steps else np.array([])
    return np.concatenate([warmup, np.full(total_steps - warmup_steps, end)])


def ema_momentum_schedule(start: float, total_steps: int) -> np.ndarray:
    """Return the EMA teacher momentum per step: cosine from ``start`` at the first step to 1 at the last."""
    return cosine_schedule(start, 1.0, total_steps)
