"""Probes fit on the queried labels only: logistic regression and a weighted kNN; and evaluation,
the one place test labels are read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

N_CLASSES = 10


def unit_features(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Center on the mean of all (unlabeled) training features, then L2-normalize."""
    mean = train.mean(axis=0, keepdims=True)

    def unit(x: np.ndarray) -> np.ndarray:
        x = x - mean
        return (x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)).astype(np.float32)

    return unit(train), unit(test)


@dataclass
class LinearProbe:
    C: float = 1.0
    max_iter: int = 2000

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        self._scale = np.sqrt(x.shape[1])  # unit vectors -> per-dimension scale ~1
        self._model = LogisticRegression(C=self.C, max_iter=self.max_iter)
        if len(np.unique(y)) == 1:  # one class seen: nothing to separate
            self._constant = int(y[0])
            return self
        self._constant = None
        self._model.fit(x * self._scale, y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self._constant is not None:
            return np.full(len(x), self._constant, dtype=np.int64)
        return self._model.predict(x * self._scale).astype(np.int64)


@dataclass
class KNNProbe:
    """Cosine similarity, top-k neighbours voting with weight exp(sim / T) (DINO eval_knn)."""

    k: int = 20
    temperature: float = 0.07

    def fit(self, x: np.ndarray, y: np.ndarray) -> KNNProbe:
        self._x, self._y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        return self

    @torch.no_grad()
    def predict(self, x: np.ndarray, chunk: int = 1024) -> np.ndarray:
        k = min(self.k, len(self._x))
        preds = []
        for block in torch.from_numpy(x).split(chunk):
            sims, idx = (block @ self._x.T).topk(k, dim=1)
            votes = torch.zeros(len(block), N_CLASSES)
            votes.scatter_add_(1, self._y[idx], (sims / self.temperature).exp())
            preds.append(votes.argmax(dim=1))
        return torch.cat(preds).numpy()


def evaluate(predictions: np.ndarray, test_labels: np.ndarray) -> dict[str, object]:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class)."""
    confusion = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(confusion, (test_labels, predictions), 1)
    per_class = confusion.diagonal() / confusion.sum(axis=1).clip(min=1)
    return {"test_accuracy": float((predictions == test_labels).mean()),
            "per_class_accuracy": [round(float(a), 4) for a in per_class],
            "confusion_matrix": confusion.tolist()}
