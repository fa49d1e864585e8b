"""Evaluation: the one place test labels are read, by every stage (probes, fine-tuning), and the
test-time views a saved classifier can be asked about (``TEST_VIEWS``)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fewlabels.data import N_CLASSES
from fewlabels.data.transforms import normalize_uint8


def _image(x: torch.Tensor) -> torch.Tensor:
    return x


def _mirror(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


# name -> the views of a test image whose softmax outputs are averaged. "flip" adds the mirror
# image: the fine-tuning weak view flips half the images (``WeakView``), so both are in-domain.
TEST_VIEWS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "none": (_image,),
    "flip": (_image, _mirror),
}


@torch.no_grad()
def predict_probs(model: nn.Module, images: torch.Tensor, views: str = "none",
                  batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities of uint8 images [N, 28, 28]: the mean softmax of ``model`` (eval mode,
    fp32) over the ``TEST_VIEWS[views]`` of each image."""
    if views not in TEST_VIEWS:
        raise ValueError(f"unknown test-time views {views!r}: choose one of {sorted(TEST_VIEWS)}")
    was_training = model.training
    model.eval()
    out = []
    for chunk in images.split(batch_size):
        x = normalize_uint8(chunk)
        out.append(torch.stack([model(view(x)).float().softmax(1)
                                for view in TEST_VIEWS[views]]).mean(0))
    model.train(was_training)
    return torch.cat(out)


def mean_std(accuracies: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation over seeds (0.0 for one seed): the spread every report
    gives beside its mean."""
    accs = np.asarray(accuracies, dtype=np.float64)
    return float(accs.mean()), float(accs.std(ddof=1)) if len(accs) > 1 else 0.0


def evaluate(predictions: np.ndarray, test_labels: np.ndarray) -> dict[str, object]:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class)."""
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(confusion, (test_labels, predictions), 1)
    per_class = confusion.diagonal() / confusion.sum(axis=1).clip(min=1)
    return {"test_accuracy": float((predictions == test_labels).mean()),
            "per_class_accuracy": [round(float(a), 4) for a in per_class],
            "confusion_matrix": confusion.tolist()}
