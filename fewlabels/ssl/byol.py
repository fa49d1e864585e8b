"""BYOL: an online network predicts a momentum target's projection (Grill et al., 2020)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from omegaconf import DictConfig

from fewlabels.ssl.base import SSLMethod, cosine


class BYOL(SSLMethod):
    def __init__(self, cfg: DictConfig, monitor_images: torch.Tensor | None = None) -> None:
        super().__init__(cfg, monitor_images)
        m = cfg.method
        self.projection_head = BYOLProjectionHead(self.feature_dim, m.proj_hidden_dim,
                                                  m.proj_output_dim)
        self.prediction_head = BYOLPredictionHead(m.proj_output_dim, m.pred_hidden_dim,
                                                  m.proj_output_dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        start, end = self.cfg.method.momentum_start, self.cfg.method.momentum_end
        total, by_time = self.trainer.estimated_stepping_batches, self.time_progress()
        momentum = (cosine(by_time, start, end) if by_time > self.global_step / total
                    else cosine_schedule(self.global_step, total, start, end))
        update_momentum(self.backbone, self.backbone_momentum, m=momentum)
        update_momentum(self.projection_head, self.projection_head_momentum, m=momentum)
        self.log("train/momentum", momentum, on_step=True, on_epoch=False)

    def _online(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.criterion(self._online(view_a), self._target(view_b))
                      + self.criterion(self._online(view_b), self._target(view_a)))
