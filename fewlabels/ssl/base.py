"""What every self-supervised method shares: backbone, two views, optimizer and schedule,
throughput, and label-free health signals. A method adds its heads and ``loss(view_a, view_b)``."""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.utils.scheduler import cosine_warmup_schedule
from omegaconf import DictConfig

from fewlabels.data.transforms import BatchedTwoViews, normalize_uint8
from fewlabels.models.backbones import build_backbone
from fewlabels.runtime import BudgetTimer, seconds


def cosine(progress: float, start: float, end: float) -> float:
    """From ``start`` at progress 0 to ``end`` at progress 1 along half a cosine."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))


def embedding_health(embeddings: torch.Tensor) -> dict[str, float]:
    """Collapse and rank signals that need no label.

    ``collapse_std``: mean per-dimension std of L2-normalized embeddings; 0 means all images map
    to one point, ``1/sqrt(d)`` is what spread-out embeddings give. ``rankme``: effective rank
    (Garrido et al., 2023), exp of the entropy of the normalized singular values.
    """
    z = F.normalize(embeddings.float(), dim=1)
    singular = torch.linalg.svdvals(embeddings.float())
    p = singular / singular.sum().clamp_min(1e-12) + 1e-12
    return {
        "collapse_std": z.std(dim=0).mean().item(),
        "collapse_std_ideal": 1.0 / embeddings.shape[1] ** 0.5,
        "rankme": torch.exp(-(p * p.log()).sum()).item(),
    }


class SSLMethod(pl.LightningModule):
    """Base LightningModule; :data:`fewlabels.ssl.METHODS` maps ``method.name`` to subclasses."""

    def __init__(self, cfg: DictConfig, monitor_images: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.feature_dim: int = self.backbone.num_features
        self.two_views = BatchedTwoViews.from_config(cfg.augment)
        self.monitor_images = monitor_images  # unlabeled uint8 images, not part of the state
        self._last_batch_end: float | None = None

    def loss(self, view_a: torch.Tensor, view_b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def _to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.trainer.channels_last \
            else x

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        views = self.two_views(batch) if isinstance(batch, torch.Tensor) else batch
        view_a, view_b = (self._to_memory_format(v) for v in views[:2])
        loss = self.loss(view_a, view_b)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True,
                 batch_size=view_a.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        n = batch.shape[0] if isinstance(batch, torch.Tensor) else batch[0].shape[0]
        if self._last_batch_end is not None:
            rate = n * self.trainer.world_size / (now - self._last_batch_end)
            self.log("train/images_per_sec", rate, prog_bar=True, on_step=True, on_epoch=True)
        self._last_batch_end = now

    def on_train_epoch_start(self) -> None:
        self._last_batch_end = None

    def time_progress(self) -> float:
        """Share of ``trainer.time_budget`` used so far, over all invocations (0 without a
        budget). The schedules take whichever is further along, their steps or this, so a
        budgeted run ends annealed also when the budget ends it before its epochs do. The
        safety net ``trainer.max_time`` never moves them: a run it stopped and resumed is the
        run its command describes."""
        limit = seconds(self.cfg.trainer.get("time_budget"))
        timer = next((c for c in self.trainer.callbacks if isinstance(c, BudgetTimer)), None)
        if not limit or timer is None:
            return 0.0
        return min(1.0, timer.time_elapsed("train") / limit)  # survives a resume

    @torch.no_grad()
    def embed_uint8(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        was_training = self.training
        self.eval()
        outs = [self.backbone(self._to_memory_format(normalize_uint8(chunk.to(self.device))))
                for chunk in images.split(batch_size)]
        self.train(was_training)
        return torch.cat(outs).float()

    def on_train_epoch_end(self) -> None:
        if self.monitor_images is None or not len(self.monitor_images):
            return
        health = embedding_health(self.embed_uint8(self.monitor_images))
        self.log_dict({f"health/{k}": v for k, v in health.items()}, sync_dist=True)

    def configure_optimizers(self) -> Any:
        opt_cfg, tr = self.cfg.optimizer, self.cfg.trainer
        world = tr.devices * tr.num_nodes if isinstance(tr.devices, int) else 1
        lr = opt_cfg.lr * self.cfg.data.batch_size * world / 256
        params = [p for p in self.parameters() if p.requires_grad]
        if opt_cfg.name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
        elif opt_cfg.name == "adamw":
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=opt_cfg.weight_decay)
        else:
            raise ValueError(f"optimizer.name={opt_cfg.name!r}: use 'sgd' or 'adamw'")
        total_steps = self.trainer.estimated_stepping_batches
        warmup_steps = opt_cfg.warmup_epochs * max(1, total_steps // tr.max_epochs)

        def lr_factor(step: int) -> float:  # lightly's warm-up and cosine, or the budget's
            by_steps = cosine_warmup_schedule(step=step, max_steps=total_steps, start_value=1.0,
                                              end_value=0.001, warmup_steps=warmup_steps,
                                              warmup_start_value=0.0)
            return min(by_steps, cosine(self.time_progress(), 1.0, 0.0))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
