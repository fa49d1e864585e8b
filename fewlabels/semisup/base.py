"""What every fine-tuning algorithm shares: a classifier (pretrained backbone + linear head), its
EMA copy, batches drawn on the training device, the optimizer and schedule, and logging.

An algorithm subclasses :class:`Learner` and writes one method,
``train_step(x_lb, y_lb, x_ulb_weak, x_ulb_strong) -> (loss, logs)``, as USB's algorithms do.
The unlabeled views are ``None`` for algorithms (or phases) that use no unlabeled image.

Batches are drawn by index from tensors that stay in memory: the labeled images (the N queried,
with the labels the database returned) and the unlabeled pool (all training images, no label).
Which images a step draws depends only on the seed and the step number, so a resumed run draws
what the killed one would have.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from lightly.utils.scheduler import cosine_warmup_schedule
from torch import nn

from fewlabels.data.transforms import StrongView, WeakView, normalize_uint8
from fewlabels.models.checkpoint import Classifier


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    warmup_steps: int
    total_steps: int


@dataclass(frozen=True)
class BatchSettings:
    labeled: int
    unlabeled_ratio: int
    seed: int
    channels_last: bool

    def images_per_step(self, with_unlabeled: bool) -> int:
        """Labeled images plus unlabeled ones (an unlabeled image's two views count once)."""
        return self.labeled * (1 + self.unlabeled_ratio * with_unlabeled)


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA's decay, ramped up over the first steps so that it is not stuck at its start on
    short runs (TensorFlow's ``num_updates`` rule)."""
    return min(decay, (1 + step) / (10 + step))


class Learner(pl.LightningModule):
    """Base LightningModule; :data:`fewlabels.semisup.ALGORITHMS` maps names to subclasses."""

    uses_unlabeled: ClassVar[bool] = True

    def __init__(self, model: Classifier, labeled_images: torch.Tensor, labels: torch.Tensor,
                 pool_images: torch.Tensor, batches: BatchSettings, optim: OptimizerSettings,
                 ema_decay: float, weak: WeakView, strong: StrongView) -> None:
        super().__init__()
        if len(labeled_images) != len(labels) or not len(labels):
            raise ValueError(f"{len(labeled_images)} labeled images for {len(labels)} labels")
        self.model = model
        self.ema_model = copy.deepcopy(model).requires_grad_(False)
        self.batches, self.optim, self.ema_decay = batches, optim, ema_decay
        self.weak, self.strong = weak, strong
        # Data, not state: kept out of the checkpoint (plain attributes, not buffers).
        self.labeled_images, self.labels, self.pool_images = labeled_images, labels, pool_images
        self._last_batch_end: float | None = None
        self.start_step = 0
        self.lb_idx: torch.Tensor | None = None
        self.ulb_idx: torch.Tensor | None = None

    # -- what an algorithm writes --------------------------------------------------------------
    def train_step(self, x_lb: torch.Tensor, y_lb: torch.Tensor, x_ulb_weak: torch.Tensor | None,
                   x_ulb_strong: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def needs_unlabeled(self, step: int) -> bool:
        return self.uses_unlabeled

    # -- shared helpers ------------------------------------------------------------------------
    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.batches.channels_last \
            else x

    def supervised_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), y)

    @torch.no_grad()
    def teacher_probs(self, teacher: nn.Module, x: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
        """Class probabilities of a teacher (the EMA model, or self-training's frozen one) on a
        batch of weak views. BatchNorm normalizes with the statistics of this batch of weak views
        (train mode), not with running statistics that strong views also shaped; the teacher's
        running statistics are not used for anything (the EMA copies the online model's)."""
        teacher.train()
        return torch.softmax(teacher(self._format(x)).float() / temperature, dim=1)

    def log_pseudo_labels(self, pseudo: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
        """Mask rate and class balance of the pseudo-labels that count (no hidden label used)."""
        counts = torch.bincount(pseudo[mask.bool()], minlength=self.model.head.out_features)
        share = counts.float() / counts.sum().clamp_min(1)
        return {"train/mask_rate": mask.float().mean(),
                **{f"pseudo/class_{c}": share[c] for c in range(len(share))}}

    # -- the loop ------------------------------------------------------------------------------
    def _draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        g = torch.Generator().manual_seed(self.batches.seed * 1_000_003 + step)
        n_lb = self.batches.labeled
        idx_lb = torch.randint(len(self.labels), (n_lb,), generator=g)
        idx_ulb = None
        if self.needs_unlabeled(step):
            idx_ulb = torch.randint(len(self.pool_images), (n_lb * self.batches.unlabeled_ratio,),
                                    generator=g)
        return idx_lb, self.labels[idx_lb], idx_ulb

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        idx_lb, y_lb, idx_ulb = self._draw(self.global_step)
        x_lb = self._format(self.weak(self.labeled_images[idx_lb].to(self.device)))
        x_weak = x_strong = None
        self.lb_idx, self.ulb_idx = idx_lb, idx_ulb  # which images this step's views are of
        if idx_ulb is not None:
            unlabeled = self.pool_images[idx_ulb].to(self.device)
            x_weak, x_strong = self._format(self.weak(unlabeled)), self._format(
                self.strong(unlabeled))
        loss, logs = self.train_step(x_lb, y_lb.to(self.device), x_weak, x_strong)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step}: lower "
                                     "optimizer.lr or raise optimizer.warmup_fraction")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict({k: v.float() if isinstance(v, torch.Tensor) else float(v)
                       for k, v in logs.items()}, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._update_ema()
        now = time.perf_counter()
        if self._last_batch_end is not None:
            per_step = self.batches.images_per_step(self.needs_unlabeled(self.global_step))
            self.log("train/images_per_sec", per_step / (now - self._last_batch_end),
                     prog_bar=True, on_step=True, on_epoch=False)
        self._last_batch_end = now

    def on_train_start(self) -> None:
        self.start_step = self.global_step  # > 0 when resumed from last.ckpt

    def on_train_epoch_start(self) -> None:
        self._last_batch_end = None

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, EMA) module pairs, as solo-learn's: the online modules are what the optimizer
        trains, the EMA ones follow them. An algorithm with a training-only module (a projection
        head) adds its pair; only the classifier is evaluated and saved."""
        return [(self.model, self.ema_model)]

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = ema_decay_at(self.global_step, self.ema_decay)
        for online, ema in self.momentum_pairs():
            torch._foreach_lerp_(list(ema.parameters()),
                                 [p.detach() for p in online.parameters()], 1.0 - decay)
            for ema_buf, buf in zip(ema.buffers(), online.buffers(), strict=True):
                ema_buf.copy_(buf)  # BatchNorm statistics: the online model's, never step 0's

    def configure_optimizers(self) -> Any:
        o = self.optim
        decay, no_decay = [], []
        for online, _ in self.momentum_pairs():
            for name, p in online.named_parameters():
                (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": o.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)

        def factor(step: int) -> float:
            return cosine_warmup_schedule(step=step, max_steps=o.total_steps, start_value=1.0,
                                          end_value=0.0, warmup_steps=o.warmup_steps,
                                          warmup_start_value=0.0)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @torch.no_grad()
    def calibrate_batchnorm(self, images: torch.Tensor, batch_size: int = 1024) -> None:
        """Running statistics of the EMA model's BatchNorm layers recomputed on plain (not
        augmented) unlabeled images: during training they mixed weak and strong views. Uses no
        label."""
        layers = [m for m in self.ema_model.modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in layers]
        for m in layers:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batches below
        self.ema_model.train()
        for chunk in images.split(batch_size):
            self.ema_model(self._format(normalize_uint8(chunk.to(self.device))))
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum
        self.ema_model.eval()

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Logits of uint8 images from the EMA model (what is evaluated and saved), eval mode."""
        model = self.ema_model
        was_training = model.training
        model.eval()
        out = [model(self._format(normalize_uint8(chunk.to(self.device)))).float().cpu()
               for chunk in images.split(batch_size)]
        model.train(was_training)
        return torch.cat(out)
