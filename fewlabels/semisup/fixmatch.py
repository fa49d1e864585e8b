"""FixMatch (Sohn et al., 2020): a confident prediction on a weak view of an unlabeled image is
the target for a strong view of the same image. Pseudo-labels come from the EMA model (a mean
teacher) or from the online model. The pseudo-label is the teacher's most probable class;
subclasses change which pseudo-labels count and how much (``pseudo_label_mask``), and may read the
confidence that decides it from adjusted probabilities (``probs_for_weights``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from fewlabels.semisup.base import Learner


@dataclass(frozen=True)
class FixMatchSettings:
    threshold: float
    lambda_u: float
    pseudo_label_model: str  # ema | online


class PseudoLabelSettings(Protocol):
    """What FixMatch's step reads from its own settings and from those of its subclasses."""

    @property
    def lambda_u(self) -> float: ...

    @property
    def pseudo_label_model(self) -> str: ...


class FixMatch(Learner):
    def __init__(self, *args: Any, settings: PseudoLabelSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if settings.pseudo_label_model not in ("ema", "online"):
            raise ValueError(f"algorithm.pseudo_label_model={settings.pseudo_label_model!r}: "
                             "use 'ema' or 'online'")
        self.settings = settings

    def probs_for_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """The probabilities whose maximum is the confidence that ``pseudo_label_mask`` sees:
        the teacher's own here. They never change the pseudo-label itself."""
        return probs

    def pseudo_label_mask(self, confidence: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        """How much each pseudo-label counts (0 or 1 here: FixMatch's one fixed threshold)."""
        assert isinstance(self.settings, FixMatchSettings)
        return confidence >= self.settings.threshold

    def train_step(self, x_lb: torch.Tensor, y_lb: torch.Tensor, x_ulb_weak: torch.Tensor | None,
                   x_ulb_strong: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        assert x_ulb_weak is not None and x_ulb_strong is not None
        s = self.settings
        if s.pseudo_label_model == "ema":
            probs = self.teacher_probs(self.ema_model, x_ulb_weak)
            logits = self.model(torch.cat([x_lb, x_ulb_strong]))
            logits_lb, logits_strong = logits[:len(x_lb)], logits[len(x_lb):]
        else:  # FixMatch as published: one forward over all three, the weak part detached
            logits = self.model(torch.cat([x_lb, x_ulb_weak, x_ulb_strong]))
            logits_lb = logits[:len(x_lb)]
            logits_weak, logits_strong = logits[len(x_lb):].float().chunk(2)
            probs = torch.softmax(logits_weak.detach(), dim=1)
        pseudo = probs.argmax(dim=1)
        confidence = self.probs_for_weights(probs).amax(dim=1)
        mask = self.pseudo_label_mask(confidence, pseudo).float()
        loss_lb = self.supervised_loss(logits_lb, y_lb)
        loss_ulb = (F.cross_entropy(logits_strong.float(), pseudo, reduction="none") * mask).mean()
        return loss_lb + s.lambda_u * loss_ulb, {
            "train/loss_lb": loss_lb.detach(), "train/loss_ulb": loss_ulb.detach(),
            "train/accuracy_lb": (logits_lb.argmax(1) == y_lb).float().mean(),
            **self.log_pseudo_labels(pseudo, mask)}
