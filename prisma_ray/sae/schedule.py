"""Learning-rate and sparsity-coefficient schedules (pure functions of the step)."""

from __future__ import annotations


def lr_factor(step: int, total_steps: int, warmup_steps: int, decay_fraction: float) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 over the last `decay_fraction`."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    decay_steps = decay_fraction * total_steps
    decay_start = total_steps - decay_steps
    decay = min(1.0, (total_steps - step) / decay_steps) if decay_steps and step >= decay_start else 1.0
    return warm * decay


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup_steps to 1 (1 throughout without warm-up)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
