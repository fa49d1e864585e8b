"""Active rounds: cold-start selection, then labels bought where the fine-tuned model is unsure.

``ACQUISITIONS`` maps ``select=`` names to functions of (probabilities, features, labeled ids,
n, seed) -> new ids; the cold-start strategies are :data:`fewlabels.probe.select.STRATEGIES`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fewlabels.active.acquire import badge, entropy, margin

ACQUISITIONS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray, int, int], np.ndarray]] = {
    "margin": margin,
    "entropy": entropy,
    "badge": badge,
}

__all__ = ["ACQUISITIONS", "badge", "entropy", "margin"]
