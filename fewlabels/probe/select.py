"""Which training ids to label, chosen from features alone (no label is read here)."""

from __future__ import annotations

import numpy as np


def select_random(n: int, n_total: int, seed: int) -> np.ndarray:
    """``n`` distinct ids; for one seed, a smaller ``n`` is a prefix of a larger one."""
    _check(n, n_total)
    return np.random.default_rng(seed).permutation(n_total)[:n]


def _unit(features: np.ndarray) -> np.ndarray:
    return features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)


def cluster(features: np.ndarray, n_clusters: int, seed: int,
            minibatch_above: int = 50) -> np.ndarray:
    """k-means cluster index of each row of L2-normalized ``features``."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = _unit(features).astype(np.float32)
    if n_clusters > minibatch_above:
        model = MiniBatchKMeans(n_clusters=n_clusters, random_state=seed, batch_size=4096,
                                n_init=1)
    else:
        model = KMeans(n_clusters=n_clusters, random_state=seed, n_init=1)
    return model.fit_predict(x)


def typicality(points: np.ndarray, neighbors: int) -> np.ndarray:
    """Inverse mean distance to the ``neighbors`` nearest other points (TypiClust, Hacohen 2022)."""
    if len(points) == 1:
        return np.ones(1)
    from sklearn.neighbors import NearestNeighbors

    k = min(neighbors, len(points) - 1)
    dist, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return 1.0 / (dist[:, 1:].mean(axis=1) + 1e-8)


def select_typiclust(features: np.ndarray, n: int, seed: int, neighbors: int = 20,
                     minibatch_above: int = 50) -> np.ndarray:
    """One id per k-means cluster (``n`` clusters): the most typical point of each."""
    _check(n, len(features))
    if n == len(features):
        return np.arange(n)
    assignment = cluster(features, n, seed, minibatch_above)
    x = _unit(features)
    chosen = []
    for c in np.unique(assignment):
        members = np.flatnonzero(assignment == c)
        chosen.append(members[np.argmax(typicality(x[members], neighbors))])
    chosen_ids = np.array(chosen, dtype=np.int64)
    if len(chosen_ids) < n:  # k-means left clusters empty: fill with the most typical leftovers
        rest = np.setdiff1d(np.arange(len(features)), chosen_ids)
        order = np.argsort(-typicality(x[rest], neighbors), kind="stable")
        chosen_ids = np.concatenate([chosen_ids, rest[order[: n - len(chosen_ids)]]])
    return chosen_ids


def select(strategy: str, features: np.ndarray, n: int, seed: int, neighbors: int = 20,
           minibatch_above: int = 50) -> np.ndarray:
    if strategy == "random":
        return select_random(n, len(features), seed)
    if strategy == "typiclust":
        return select_typiclust(features, n, seed, neighbors, minibatch_above)
    raise ValueError(f"strategy={strategy!r}: use 'random' or 'typiclust'")


def _check(n: int, n_total: int) -> None:
    if not 1 <= n <= n_total:
        raise ValueError(f"n={n}: choose between 1 and {n_total} labels")
