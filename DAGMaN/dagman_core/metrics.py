"""Overlap metrics between label maps."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Return the Dice similarity coefficient of two binary masks of one shape (1.0 when both are empty)."""
    prediction = np.asarray(prediction).astype(bool)
    reference = np.asarray(reference).astype(bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"mask shapes differ: prediction {prediction.shape}, reference {reference.shape}")
    total = prediction.sum() + reference.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(prediction, reference).sum() / total)
