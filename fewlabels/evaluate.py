"""Evaluation: the one place test labels are read, by every stage (probes, fine-tuning)."""

from __future__ import annotations

import numpy as np

from fewlabels.data import N_CLASSES


def evaluate(predictions: np.ndarray, test_labels: np.ndarray) -> dict[str, object]:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class)."""
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(confusion, (test_labels, predictions), 1)
    per_class = confusion.diagonal() / confusion.sum(axis=1).clip(min=1)
    return {"test_accuracy": float((predictions == test_labels).mean()),
            "per_class_accuracy": [round(float(a), 4) for a in per_class],
            "confusion_matrix": confusion.tolist()}
