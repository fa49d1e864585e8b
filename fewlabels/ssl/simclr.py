"""SimCLR: NT-Xent between the projections of two views (Chen et al., 2020)."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from omegaconf import DictConfig

from fewlabels.ssl.base import SSLMethod


class SimCLR(SSLMethod):
    def __init__(self, cfg: DictConfig, monitor_images: torch.Tensor | None = None) -> None:
        super().__init__(cfg, monitor_images)
        m = cfg.method
        self.projection_head = SimCLRProjectionHead(self.feature_dim, m.proj_hidden_dim,
                                                    m.proj_output_dim)
        distributed = cfg.trainer.num_nodes > 1 or (
            isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 1)
        self.criterion = NTXentLoss(temperature=m.temperature, gather_distributed=distributed)

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        z_a = self.projection_head(self.backbone(view_a))
        z_b = self.projection_head(self.backbone(view_b))
        return self.criterion(z_a, z_b)
