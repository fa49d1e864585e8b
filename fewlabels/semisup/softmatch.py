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

The running estimates are updated from every step's weak views with momentum ``momentum``, before
they are used, and are bias-corrected as Adam's moments are: each is the momentum-weighted mean of
the batches seen so far, with no weight left on a starting value. The paper starts them at a
mean confidence of 1/C and a variance of 1 and runs 2^20 steps, after which that start is long
forgotten; in a 3,000-step run with momentum 0.999 it would still weigh 0.999^1500 = 22% at
half-way, and the variance's start of 1 would give nearly every pseudo-label a weight of about 1
(docs/results.md gives the run that showed it). They are buffers, so a resumed run continues with
them. ``train/mask_rate`` is the mean weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fewlabels.semisup.fixmatch import FixMatch


class RunningMean(nn.Module):
    """An exponential moving average with Adam's bias correction: after any number of updates,
    the momentum-weighted mean of the values seen (with momentum 0, the last value)."""

    def __init__(self, shape: tuple[int, ...], momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("total", torch.zeros(shape))
        self.register_buffer("weight", torch.tensor(0.0))  # 1 - momentum ** updates

    @torch.no_grad()
    def update(self, value: torch.Tensor) -> torch.Tensor:
        self.total.lerp_(value.to(self.total.dtype), 1 - self.momentum)
        self.weight.lerp_(torch.ones_like(self.weight), 1 - self.momentum)
        return self.value

    @property
    def value(self) -> torch.Tensor:
        return self.total / self.weight.clamp_min(torch.finfo(self.total.dtype).tiny)


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
        self.settings: SoftMatchSettings = settings
        n_classes = self.model.head.out_features
        self.class_distribution = RunningMean((n_classes,), settings.momentum)
        self.confidence_mean = RunningMean((), settings.momentum)
        self.confidence_var = RunningMean((), settings.momentum)

    @torch.no_grad()
    def probs_for_weights(self, probs: torch.Tensor) -> torch.Tensor:
        if not self.settings.uniform_alignment:
            return probs
        aligned = probs / self.class_distribution.update(probs.mean(dim=0))
        return aligned / aligned.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def pseudo_label_mask(self, confidence: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        mean = self.confidence_mean.update(confidence.mean())
        var = self.confidence_var.update(confidence.var()) if len(confidence) > 1 \
            else self.confidence_var.value
        width_sq = var.clamp_min(1e-12) / self.settings.n_sigma ** 2
        below = (confidence - mean).clamp(max=0)
        return torch.exp(-below.square() / (2 * width_sq))

    def train_step(self, *args: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = super().train_step(*args)
        return loss, {**logs, "softmatch/confidence_mean": self.confidence_mean.value,
                      "softmatch/confidence_std": self.confidence_var.value.sqrt(),
                      **{f"softmatch/class_distribution_{c}": p
                         for c, p in enumerate(self.class_distribution.value)}}
