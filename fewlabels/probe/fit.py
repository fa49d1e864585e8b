"""Probes fit on the queried labels only: logistic regression, a weighted kNN, and label
propagation over the unlabeled training images. Every probe is ``fit(pool, ids, labels)``:
``pool`` holds the unit features of all training images, ``ids`` the queried ones, ``labels``
what the label database answered."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fewlabels.data import N_CLASSES


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

    def fit(self, pool: np.ndarray, ids: np.ndarray, y: np.ndarray) -> LinearProbe:
        from sklearn.linear_model import LogisticRegression

        x = pool[ids]
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

    def fit(self, pool: np.ndarray, ids: np.ndarray, y: np.ndarray) -> KNNProbe:
        self._x = torch.from_numpy(pool[ids])
        self._scores = torch.nn.functional.one_hot(torch.from_numpy(y.astype(np.int64)),
                                                   N_CLASSES).float()
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.vote(*top_k(x, self._x.numpy(), min(self.k, len(self._x))))

    def vote(self, neighbours: np.ndarray, sims: np.ndarray) -> np.ndarray:
        """Each of the top-k neighbours adds exp(sim / T) times its class scores."""
        weights = torch.from_numpy(sims / self.temperature).exp().unsqueeze(-1)
        scores = self._scores[torch.from_numpy(neighbours)]
        return (weights * scores).sum(dim=1).argmax(dim=1).numpy()


@torch.no_grad()
def top_k(queries: np.ndarray, reference: np.ndarray, k: int,
          chunk: int = 2048, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of each query's ``k`` most similar reference rows."""
    ref = torch.from_numpy(reference)
    neighbours, sims = [], []
    for start in range(0, len(queries), chunk):
        block = torch.from_numpy(queries[start:start + chunk]) @ ref.T
        if exclude_self:
            block[torch.arange(len(block)), torch.arange(start, start + len(block))] = -2.0
        s, i = block.topk(k, dim=1)
        neighbours.append(i)
        sims.append(s)
    return torch.cat(neighbours).numpy(), torch.cat(sims).numpy()


def knn_graph(pool: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pool point's ``k`` nearest other points: (indices, cosine similarities)."""
    return top_k(pool, pool, min(k, len(pool) - 1), exclude_self=True)


@dataclass
class LabelPropagationProbe(KNNProbe):
    """Labels diffused over the kNN graph of all training images (Zhou et al., 2004; Iscen et
    al., 2019: edge weight sim^gamma, symmetric normalization, conjugate gradient), then the
    kNN vote of :class:`KNNProbe` over every training image's diffused class scores."""

    graph_k: int = 20
    alpha: float = 0.99
    gamma: float = 3.0
    iterations: int = 20
    graph: tuple[np.ndarray, np.ndarray] | None = None  # knn_graph(pool, graph_k), reusable
    # top_k(queries, pool, k) of the rows predict() will be given, computed once per checkpoint
    query_neighbours: tuple[np.ndarray, np.ndarray] | None = None

    def fit(self, pool: np.ndarray, ids: np.ndarray, y: np.ndarray) -> LabelPropagationProbe:
        from scipy.sparse import csr_matrix, diags, eye
        from scipy.sparse.linalg import cg

        if self.graph is None:
            self.graph = knn_graph(pool, self.graph_k)
        neighbours, sims = self.graph
        n, k = neighbours.shape
        rows = np.repeat(np.arange(n), k)
        w = csr_matrix((np.clip(sims, 0, None).ravel() ** self.gamma, (rows, neighbours.ravel())),
                       shape=(n, n))
        w = w + w.T
        d = 1.0 / np.sqrt(np.asarray(w.sum(axis=1)).ravel().clip(min=1e-12))
        system = eye(n) - self.alpha * (diags(d) @ w @ diags(d))
        scores = np.zeros((n, N_CLASSES), dtype=np.float64)
        for c in range(N_CLASSES):
            target = np.zeros(n)
            target[ids[y == c]] = 1.0
            if target.any():
                scores[:, c], _ = cg(system, target, maxiter=self.iterations)
        scores = scores.clip(min=0)
        scores /= scores.sum(axis=1, keepdims=True).clip(min=1e-12)
        self._x = torch.from_numpy(pool)
        self._scores = torch.from_numpy(scores.astype(np.float32))
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.query_neighbours is None:
            return super().predict(x)
        neighbours, sims = self.query_neighbours
        if len(neighbours) != len(x) or neighbours.shape[1] != min(self.k, len(self._x)):
            raise ValueError("query_neighbours were computed for other queries or another k")
        return self.vote(neighbours, sims)
