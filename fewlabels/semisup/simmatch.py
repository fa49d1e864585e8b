"""SimMatch (Zheng et al., 2022) on FlexMatch's class-wise thresholds: pseudo-labels and a second
consistency term from the similarity of each unlabeled image to the labeled ones.

A projection head (training only: the classifier alone is evaluated and saved) maps backbone
features to unit vectors. A bank holds the EMA model's vector of every queried image (filled
once at the start, then each step's labeled batch overwrites its rows); its labels are the ones
the database returned. For the weak view of an unlabeled image, the EMA model gives class
probabilities ``p`` and a softmax ``q`` of its similarities to the bank (temperature
``temperature``). Label propagation then joins the two:

- *aggregation*: ``q`` summed per class of the labeled images it points at, mixed into the
  pseudo-label's probabilities, ``smoothing_alpha * p + (1 - smoothing_alpha) * agg(q)``; the
  pseudo-label is their argmax and FlexMatch's threshold reads their maximum;
- *unfolding*: ``q`` weighted, per labeled image, by ``p`` of that image's class and
  renormalized, is the target of the strong view's own similarity softmax (the instance term,
  weight ``lambda_in``): a strong view must point at the labeled images of the class the
  classifier believes, which shapes the features where the upper-body classes meet.

Uses no hidden label: the bank's labels are the queried ones.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewlabels.semisup.flexmatch import FlexMatch


@dataclass(frozen=True)
class SimMatchSettings:
    threshold: float
    lambda_u: float
    pseudo_label_model: str  # ema (the bank is the EMA model's)
    lambda_in: float         # weight of the instance (similarity) term
    temperature: float       # of the similarity softmax over the bank
    smoothing_alpha: float   # the classifier's share of the pseudo-label's probabilities
    projection_dim: int


class SimMatch(FlexMatch):
    def __init__(self, *args: Any, settings: SimMatchSettings, **kwargs: Any) -> None:
        super().__init__(*args, settings=settings, **kwargs)
        if settings.pseudo_label_model != "ema":
            raise ValueError(f"algorithm.pseudo_label_model={settings.pseudo_label_model!r}: "
                             "simmatch's bank holds the EMA model's vectors; use 'ema'")
        if (settings.temperature <= 0 or not 0 <= settings.smoothing_alpha <= 1
                or settings.lambda_in < 0 or settings.projection_dim < 1):
            raise ValueError("algorithm.temperature must be > 0, algorithm.smoothing_alpha in "
                             "[0, 1], algorithm.lambda_in >= 0 and algorithm.projection_dim >= 1")
        self.settings: SimMatchSettings = settings
        width = self.model.head.in_features
        self.projector = nn.Sequential(nn.Linear(width, width), nn.ReLU(),
                                       nn.Linear(width, settings.projection_dim))
        self.ema_projector = copy.deepcopy(self.projector).requires_grad_(False)
        # State (a buffer), so that a resumed run continues with the bank it had. All zeros until
        # it is filled: its rows are unit vectors from then on.
        self.register_buffer("bank", torch.zeros(len(self.labels), settings.projection_dim))

    @property
    def bank_filled(self) -> bool:
        return bool(self.bank.any())

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [*super().momentum_pairs(), (self.projector, self.ema_projector)]

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA model's class probabilities and unit vectors for a batch of weak views
        (BatchNorm in train mode, as :meth:`teacher_probs`)."""
        self.ema_model.train()
        features = self.ema_model.backbone(x)
        probs = torch.softmax(self.ema_model.head(features).float(), dim=1)
        return probs, F.normalize(self.ema_projector(features).float(), dim=1)

    def similarity_logits(self, vectors: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
        """Cosine similarities to the bank over the temperature, in float32 under any autocast
        (divided by a temperature of 0.1, bf16's rounding would move them by several hundredths)."""
        with torch.autocast(self.device.type, enabled=False):
            return vectors.float() @ bank.float().T / self.settings.temperature

    @torch.no_grad()
    def fill_bank(self, batch_size: int = 512) -> None:
        """Every queried image's vector, from weak views, before the first step uses the bank."""
        for start in range(0, len(self.labeled_images), batch_size):
            chunk = self.labeled_images[start:start + batch_size].to(self.device)
            _, vectors = self.teacher_outputs(self._format(self.weak(chunk)))
            self.bank[start:start + len(chunk)] = vectors

    def train_step(self, x_lb: torch.Tensor, y_lb: torch.Tensor, x_ulb_weak: torch.Tensor | None,
                   x_ulb_strong: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        assert x_ulb_weak is not None and x_ulb_strong is not None and self.lb_idx is not None
        s = self.settings
        if not self.bank_filled:
            self.fill_bank()
        bank = self.bank.clone()  # this step's bank; its rows are overwritten below
        bank_labels = self.labels.to(self.device)
        probs, vectors_weak = self.teacher_outputs(x_ulb_weak)
        with torch.no_grad():
            similarity = torch.softmax(self.similarity_logits(vectors_weak, bank), dim=1)
            aggregated = torch.zeros_like(probs).index_add_(1, bank_labels, similarity)
            refined = s.smoothing_alpha * probs + (1 - s.smoothing_alpha) * aggregated
            unfolded = similarity * probs[:, bank_labels]
            instance_target = unfolded / unfolded.sum(dim=1, keepdim=True).clamp_min(1e-12)
        features = self.model.backbone(torch.cat([x_lb, x_ulb_strong]))
        logits = self.model.head(features).float()
        logits_lb, logits_strong = logits[:len(x_lb)], logits[len(x_lb):]
        vectors_strong = F.normalize(self.projector(features[len(x_lb):]).float(), dim=1)
        confidence, pseudo = refined.max(dim=1)
        mask = self.pseudo_label_mask(confidence, pseudo).float()
        loss_lb = self.supervised_loss(logits_lb, y_lb)
        loss_ulb = (F.cross_entropy(logits_strong, pseudo, reduction="none") * mask).mean()
        loss_in = -(instance_target * F.log_softmax(self.similarity_logits(vectors_strong, bank),
                                                    dim=1)).sum(dim=1).mean()
        _, vectors_lb = self.teacher_outputs(x_lb)
        self.bank[self.lb_idx.to(self.device)] = vectors_lb
        return loss_lb + s.lambda_u * loss_ulb + s.lambda_in * loss_in, {
            "train/loss_lb": loss_lb.detach(), "train/loss_ulb": loss_ulb.detach(),
            "train/loss_in": loss_in.detach(),
            "train/accuracy_lb": (logits_lb.argmax(1) == y_lb).float().mean(),
            **self.log_pseudo_labels(pseudo, mask), **self.threshold_logs()}
