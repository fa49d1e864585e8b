"""Which training ids to label, chosen from features alone (no label is read here)."""

from __future__ import annotations

from collections.abc import Callable

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
                     minibatch_above: int = 50, max_clusters: int = 500) -> np.ndarray:
    """TypiClust (Hacohen et al., 2022): k-means into min(n, max_clusters) clusters; then, n times,
    the most typical unpicked point of the cluster with the fewest picks (ties: the larger).
    With n <= max_clusters that is one id per cluster."""
    _check(n, len(features))
    if n == len(features):
        return np.arange(n)
    assignment = cluster(features, min(n, max_clusters), seed, minibatch_above)
    x = _unit(features)
    ranked = {}  # cluster -> members, most typical first
    for c in np.unique(assignment):
        members = np.flatnonzero(assignment == c)
        ranked[c] = members[np.argsort(-typicality(x[members], neighbors), kind="stable")]
    picks = dict.fromkeys(ranked, 0)
    chosen = []
    for _ in range(n):
        c = min((c for c in ranked if picks[c] < len(ranked[c])),
                key=lambda c: (picks[c], -len(ranked[c]), c))
        chosen.append(ranked[c][picks[c]])
        picks[c] += 1
    return np.array(chosen, dtype=np.int64)


def _random(features: np.ndarray, n: int, seed: int, **_: int) -> np.ndarray:
    return select_random(n, len(features), seed)


def probcover_radius(x: np.ndarray, seed: int, alpha: float = 0.95, n_clusters: int = 10,
                     sample: int = 2000) -> float:
    """ProbCover's ball radius: the largest delta whose balls are ``alpha``-pure, a ball being
    pure when it holds points of one k-means cluster only (k = the number of classes, which is
    known without any label). Estimated on ``sample`` seeded centres against all points."""
    import torch

    assignment = torch.from_numpy(cluster(x, n_clusters, seed))
    xt = torch.from_numpy(x).float()
    centres = np.random.default_rng(seed).choice(len(x), min(sample, len(x)), replace=False)
    nearest_other = []
    for chunk in np.array_split(centres, max(1, len(centres) // 256)):
        dist = torch.cdist(xt[chunk], xt)
        dist[assignment[chunk][:, None] == assignment[None, :]] = float("inf")
        nearest_other.append(dist.min(dim=1).values)
    # purity(delta) = share of balls with no point of another cluster = P(nearest_other > delta)
    return float(torch.quantile(torch.cat(nearest_other), 1.0 - alpha))


def select_probcover(features: np.ndarray, n: int, seed: int, alpha: float = 0.95,
                     n_clusters: int = 10, **_: int) -> np.ndarray:
    """ProbCover (Yehuda et al., 2022): greedy maximum coverage of the delta-ball graph on
    L2-normalized features; each pick is the point whose ball covers the most points not yet
    covered. When every point is covered, the rest are drawn at random (seeded), as the paper
    does. Sparse and chunked: 60,000 points need no 60,000 x 60,000 matrix."""
    import torch
    from scipy import sparse

    _check(n, len(features))
    x = _unit(features).astype(np.float32)
    delta = probcover_radius(x, seed, alpha, n_clusters)
    xt = torch.from_numpy(x)
    rows, cols = [], []
    for start in range(0, len(x), 1024):  # the radius graph, a chunk of rows at a time
        within = torch.nonzero(torch.cdist(xt[start:start + 1024], xt) <= delta)
        rows.append(within[:, 0].numpy() + start)
        cols.append(within[:, 1].numpy())
    r, c = np.concatenate(rows), np.concatenate(cols)
    graph = sparse.csr_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(len(x),) * 2)
    uncovered_in_ball = np.diff(graph.indptr).astype(np.int64)  # the graph is symmetric
    covered = np.zeros(len(x), dtype=bool)
    chosen: list[int] = []
    rng = np.random.default_rng(seed)
    picked = np.zeros(len(x), dtype=bool)
    while len(chosen) < n:
        best = int(np.argmax(np.where(picked, -1, uncovered_in_ball)))
        if uncovered_in_ball[best] <= 0:  # all covered: the rest at random
            rest = rng.permutation(np.flatnonzero(~picked))[:n - len(chosen)]
            chosen.extend(int(i) for i in rest)
            break
        chosen.append(best)
        picked[best] = True
        ball = graph.indices[graph.indptr[best]:graph.indptr[best + 1]]
        newly = ball[~covered[ball]]
        covered[newly] = True
        # each newly covered point: every ball that holds it covers one point fewer
        uncovered_in_ball -= np.bincount(graph[newly].indices, minlength=len(x))
    return np.array(chosen, dtype=np.int64)


# strategy name -> selection from the features of all training images (no label is read).
STRATEGIES: dict[str, Callable[..., np.ndarray]] = {
    "random": _random,
    "typiclust": select_typiclust,
    "probcover": select_probcover,
}


def check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: use one of {', '.join(STRATEGIES)}")


def select(strategy: str, features: np.ndarray, n: int, seed: int, neighbors: int = 20,
           minibatch_above: int = 50, max_clusters: int = 500) -> np.ndarray:
    check_strategy(strategy)
    return STRATEGIES[strategy](features, n, seed, neighbors=neighbors,
                                minibatch_above=minibatch_above, max_clusters=max_clusters)


def _check(n: int, n_total: int) -> None:
    if not 1 <= n <= n_total:
        raise ValueError(f"n={n}: choose between 1 and {n_total} labels")
