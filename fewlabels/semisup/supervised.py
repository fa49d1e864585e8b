"""Supervised fine-tuning on the queried images alone, weak augmentation: the baseline."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from fewlabels.semisup.base import Learner


class Supervised(Learner):
    uses_unlabeled: ClassVar[bool] = False

    def train_step(self, x_lb: torch.Tensor, y_lb: torch.Tensor, x_ulb_weak: torch.Tensor | None,
                   x_ulb_strong: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = self.model(x_lb)
        return self.supervised_loss(logits, y_lb), {
            "train/accuracy_lb": (logits.argmax(1) == y_lb).float().mean()}
