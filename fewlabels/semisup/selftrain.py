"""Self-training as in SimCLRv2 (Chen et al., 2020b), with noisy students (Xie et al., 2020).

The first ``teacher_fraction`` of the steps fine-tunes a teacher on the queried labels alone
(none with 0: the teacher is the model as it starts, a fine-tuned one; ``distill`` does that).
Then each of ``generations`` students continues from it and learns, besides the labeled loss,
to match the frozen teacher's soft predictions on weak views of the unlabeled pool from strong
views of the same images. A new generation's teacher is the EMA model at the end of the last.
The teacher is a submodule, so a resumed run continues with the teacher it had.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fewlabels.semisup.base import Learner


@dataclass(frozen=True)
class SelfTrainSettings:
    teacher_fraction: float
    generations: int
    temperature: float
    lambda_u: float


class SelfTrain(Learner):
    def __init__(self, *args: Any, settings: SelfTrainSettings, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not 0 <= settings.teacher_fraction < 1 or settings.generations < 1:
            raise ValueError("algorithm.teacher_fraction must be in [0, 1) and "
                             "algorithm.generations >= 1")
        self.settings = settings
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        total = self.optim.total_steps
        first = round(total * settings.teacher_fraction)
        length = (total - first) / settings.generations
        self.generation_starts = [first + round(g * length) for g in range(settings.generations)]

    def needs_unlabeled(self, step: int) -> bool:
        return step >= self.generation_starts[0]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step in self.generation_starts:  # a new student: freeze its teacher
            self.teacher.load_state_dict(self.ema_model.state_dict())

    def train_step(self, x_lb: torch.Tensor, y_lb: torch.Tensor, x_ulb_weak: torch.Tensor | None,
                   x_ulb_strong: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        if x_ulb_weak is None or x_ulb_strong is None:  # the first teacher: labels alone
            logits = self.model(x_lb)
            return self.supervised_loss(logits, y_lb), {
                "train/accuracy_lb": (logits.argmax(1) == y_lb).float().mean()}
        t = self.settings.temperature
        targets = self.teacher_probs(self.teacher, x_ulb_weak, t)
        logits = self.model(torch.cat([x_lb, x_ulb_strong]))
        logits_lb, logits_strong = logits[:len(x_lb)], logits[len(x_lb):].float()
        loss_lb = self.supervised_loss(logits_lb, y_lb)
        loss_ulb = F.kl_div(F.log_softmax(logits_strong / t, dim=1), targets,
                            reduction="batchmean") * t * t
        confidence, pseudo = targets.max(dim=1)
        return loss_lb + self.settings.lambda_u * loss_ulb, {
            "train/loss_lb": loss_lb.detach(), "train/loss_ulb": loss_ulb.detach(),
            "train/accuracy_lb": (logits_lb.argmax(1) == y_lb).float().mean(),
            "train/teacher_confidence": confidence.mean(),
            **self.log_pseudo_labels(pseudo, torch.ones_like(confidence))}
