"""Which unlabeled ids to query next, from a trained model's view of the pool (no label read).

Each function takes the model's class probabilities and penultimate features for every pool
image, the ids that are labeled already, how many to pick and a seed, and returns new ids, most
wanted first. :data:`fewlabels.active.ACQUISITIONS` maps config names to them.
"""

from __future__ import annotations

import numpy as np
import torch


def _candidates(n_pool: int, labeled: np.ndarray, n: int) -> np.ndarray:
    free = np.setdiff1d(np.arange(n_pool), labeled, assume_unique=False)
    if n > len(free):
        raise ValueError(f"{n} new labels asked for but only {len(free)} unlabeled images remain")
    return free


def _least(score: np.ndarray, candidates: np.ndarray, n: int, seed: int) -> np.ndarray:
    """The ``n`` candidates with the smallest score; ties broken by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(candidates))
    ranked = order[np.argsort(score[candidates][order], kind="stable")]
    return candidates[ranked[:n]].astype(np.int64)


def margin(probs: np.ndarray, features: np.ndarray, labeled: np.ndarray, n: int,
           seed: int) -> np.ndarray:
    """Smallest gap between the two most probable classes (Scheffer et al., 2001)."""
    candidates = _candidates(len(probs), labeled, n)
    top2 = np.sort(probs, axis=1)[:, -2:]
    return _least(top2[:, 1] - top2[:, 0], candidates, n, seed)


def entropy(probs: np.ndarray, features: np.ndarray, labeled: np.ndarray, n: int,
            seed: int) -> np.ndarray:
    """Largest predictive entropy."""
    candidates = _candidates(len(probs), labeled, n)
    ent = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
    return _least(-ent, candidates, n, seed)


def badge(probs: np.ndarray, features: np.ndarray, labeled: np.ndarray, n: int,
          seed: int) -> np.ndarray:
    """BADGE (Ash et al., 2020): k-means++ seeding on the gradient embeddings of the last layer,
    g = (p - onehot(argmax p)) x h, which are large where the model is unsure and spread where
    the pool is diverse. The outer product is never built: for g = a x h,
    |g_i - g_j|^2 = |a_i|^2 |h_i|^2 + |a_j|^2 |h_j|^2 - 2 (a_i . a_j)(h_i . h_j)."""
    candidates = _candidates(len(probs), labeled, n)
    p = torch.from_numpy(probs[candidates]).double()
    a = p.clone()
    a[torch.arange(len(a)), p.argmax(1)] -= 1.0
    h = torch.from_numpy(features[candidates]).double()
    sq = (a * a).sum(1) * (h * h).sum(1)  # |g_i|^2
    g = torch.Generator().manual_seed(seed)
    first = int(torch.argmax(sq))
    chosen = [first]
    nearest = (sq + sq[first] - 2 * (a @ a[first]) * (h @ h[first])).clamp_min(0)
    while len(chosen) < n:
        weights = nearest.clone()
        weights[chosen] = 0.0
        if float(weights.sum()) <= 0:  # every candidate coincides with a pick: take any other
            rest = [i for i in torch.randperm(len(sq), generator=g).tolist() if i not in chosen]
            chosen.extend(rest[:n - len(chosen)])
            break
        pick = int(torch.multinomial(weights, 1, generator=g))
        chosen.append(pick)
        dist = (sq + sq[pick] - 2 * (a @ a[pick]) * (h @ h[pick])).clamp_min(0)
        nearest = torch.minimum(nearest, dist)
    return candidates[np.array(chosen, dtype=np.int64)]
