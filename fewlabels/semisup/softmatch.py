"""SoftMatch (Chen et al., 2023): FixMatch in which every pseudo-label counts, weighted by how
its confidence compares with the running confidence of the pool; the confidence is read from
the teacher's probabilities aligned to a uniform class distribution.

Two mechanisms against the quantity-quality trade-off of a fixed threshold:

- *Uniform alignment.* A running mean of the teacher's class probabilities on the unlabeled
  batches estimates which classes the model over- and under-predicts; each probability vector
  is divided by it and renormalised. As in the paper, the aligned probabilities only set the
  weights: the pseudo-label stays the teacher's own most probable class, but one of a class the
  model rarely predicts (on Fashion-MNIST: Shirt) gains confidence and so weight. Fashion-MNIST's
  classes are balanced; no hidden label is read.
- *Truncated Gaussian weights.* A pseudo-label whose (aligned) confidence reaches the running
  mean confidence ``mu`` weighs 1; below it, ``exp(-(c - mu)^2 / (2 (sigma / n_sigma)^2))``,
  where ``sigma^2`` is the running variance of the confidences.

The running estimates are buffers (a resumed run continues with them) updated from every step's
weak views with momentum ``momentum``, before they are used. ``train/mask_rate`` is the mean
weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fewlabels.semisup.fixmatch import FixMatch


@dataclass(frozen=True)
class SoftMatchSettings:
    lambda_u: float
    pseudo_label_model: str  # ema | online
    n_sigma: float           # the Gaussian's width is the running std of confidence / n_sigma
    momentum: float          # of the running class distribution, confidence mean and variance
    uniform_alignment: bool


class SoftMatch(FixMatch):
    def __init__(self, *args: Any, settings: SoftMatchSettings, **kwargs: Any) -> None:
        super().__init__(*args, settings=settings, **kwargs)
        if settings.n_sigma <= 0 or not 0 <= settings.momentum < 1:
            raise ValueError(f"algorithm.n_sigma={settings.n_sigma} must be > 0 and "
                             f"algorithm.momentum={settings.momentum} in [0, 1)")
        self.soft = settings
        n_classes = self.model.head.out_features
        self.register_buffer("class_distribution", torch.full((n_classes,), 1.0 / n_classes))
        self.register_buffer("confidence_mean", torch.tensor(1.0 / n_classes))
        self.register_buffer("confidence_var", torch.tensor(1.0))

    @torch.no_grad()
    def probs_for_weights(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.soft.uniform_alignment:
            return probs
        self.class_distribution.lerp_(probs.mean(dim=0), 1 - self.soft.momentum)
        aligned = probs / self.class_distribution
        return aligned / aligned.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def pseudo_label_mask(self, confidence: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        weight = 1 - self.soft.momentum
        self.confidence_mean.lerp_(confidence.mean(), weight)
        if len(confidence) > 1:
            self.confidence_var.lerp_(confidence.var(), weight)
        width_sq = self.confidence_var.clamp_min(1e-12) / self.soft.n_sigma ** 2
        below = (confidence - self.confidence_mean).clamp(max=0)
        return torch.exp(-below.square() / (2 * width_sq))

    def train_step(self, *args: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = super().train_step(*args)
        return loss, {**logs, "softmatch/confidence_mean": self.confidence_mean.clone(),
                      "softmatch/confidence_std": self.confidence_var.sqrt(),
                      **{f"softmatch/class_distribution_{c}": p
                         for c, p in enumerate(self.class_distribution)}}
