"""The card's postprocessing: softmax, sort, keep the most probable classes."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [N, C] scores, shifted by the max for stability."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    probabilities: np.ndarray = exp / exp.sum(axis=-1, keepdims=True)
    return probabilities


def rank(logits: np.ndarray) -> np.ndarray:
    """Class indices, most probable first, per row of [N, C] scores.

    The int8 model's scores are quantised, so exact ties are common; sorting the negated raw
    scores with numpy's default sort reproduces the card's (and the reference's) order among
    ties, which sorting the probabilities or a stable sort would not.
    """
    return np.argsort(-logits, axis=-1)
