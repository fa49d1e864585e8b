"""``fewlabels pretrain``: fit a registered SSL method on the unlabeled training images and write
``checkpoints/<run>/{last.ckpt, backbone.safetensors, config.yaml, provenance.json}``."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from torch.utils.data import DataLoader, Dataset

from fewlabels.config import to_yaml
from fewlabels.data.fashion_mnist import FILES, load_train_images
from fewlabels.data.transforms import per_image_two_views
from fewlabels.files import write_json_atomic, write_text_atomic
from fewlabels.models.checkpoint import (
    BACKBONE_FILE,
    CONFIG_FILE,
    ENDED_BY_TIME_CAP,
    KIND_BACKBONE,
    LAST_FILE,
    PROVENANCE_FILE,
    WANDB_ID_FILE,
    save_weights,
)
from fewlabels.names import safe_name
from fewlabels.runtime import (
    AtomicCheckpointIO,
    EpochShuffle,
    StepSeeds,
    TrainingClock,
    budget_spent,
    check_durations,
    git_commit,
    hardware,
    resolve_precision,
    time_limits,
)
from fewlabels.ssl import method_class
from fewlabels.tracking import wandb_mode


class UnlabeledImages(Dataset):
    """uint8 images; ``__getitems__`` lets the DataLoader fetch a whole batch with one index."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        return self.images[torch.as_tensor(indices)]


class TwoViewImages(Dataset):
    """PIL images through a per-image two-view transform (the lightly-example path)."""

    def __init__(self, images: np.ndarray, transform: Any) -> None:
        from PIL import Image

        self.images, self.transform, self._to_pil = images, transform, Image.fromarray

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        return self.transform(self._to_pil(self.images[index], mode="L"))


def _as_batch(batch: torch.Tensor) -> torch.Tensor:
    return batch


def make_loader(cfg: DictConfig, images: np.ndarray) -> DataLoader:
    data = cfg.data
    if data.augment == "batched":  # views are made on the training device in training_step
        return DataLoader(UnlabeledImages(torch.from_numpy(images)), batch_size=data.batch_size,
                          sampler=EpochShuffle(len(images), cfg.seed), drop_last=True,
                          collate_fn=_as_batch,
                          pin_memory=torch.cuda.is_available())
    if data.augment == "per_image":
        return DataLoader(TwoViewImages(images, per_image_two_views(cfg.augment)),
                          batch_size=data.batch_size, sampler=EpochShuffle(len(images), cfg.seed),
                          drop_last=True,
                          num_workers=data.num_workers,
                          persistent_workers=data.num_workers > 0)
    raise ValueError(f"data.augment={data.augment!r}: use 'batched' or 'per_image'")


def run_name(cfg: DictConfig) -> str:
    return safe_name(cfg.run_name or f"{cfg.method.name}-{cfg.preset}-seed{cfg.seed}",
                     "run_name")


def validate(cfg: DictConfig, n_images: int) -> None:
    """Arguments checked before any file is written."""
    run_name(cfg)
    tr, data = cfg.trainer, cfg.data
    if isinstance(tr.max_epochs, bool) or not isinstance(tr.max_epochs, int) or tr.max_epochs < 1:
        raise ValueError(f"trainer.max_epochs={tr.max_epochs!r}: must be a whole number >= 1")
    check_durations(tr)
    if not isinstance(data.batch_size, int) or not 1 <= data.batch_size <= n_images:
        raise ValueError(f"data.batch_size={data.batch_size!r}: must be between 1 and the "
                         f"{n_images} training images used (data.limit={data.limit})")


def export_backbone(module: pl.LightningModule, cfg: DictConfig, path: Path) -> None:
    save_weights(module.backbone, path, KIND_BACKBONE,
                 OmegaConf.to_container(cfg.backbone, resolve=True), module.feature_dim,
                 method=cfg.method.name, run_name=run_name(cfg))


def pretrain(cfg: DictConfig) -> Path:
    """Train (or resume) the run named by ``cfg``; returns its checkpoint folder."""
    images = load_train_images(cfg.data.dir).images[: cfg.data.limit]
    validate(cfg, len(images))
    pl.seed_everything(cfg.seed, workers=True)
    name = run_name(cfg)
    ckpt_dir = Path(cfg.checkpoint_dir) / name
    if (ckpt_dir / BACKBONE_FILE).is_file() and not (ckpt_dir / LAST_FILE).is_file():
        raise ValueError(f"{ckpt_dir} holds a finished backbone without its training state "
                         f"({LAST_FILE}): shipped or copied, it cannot be resumed, and training "
                         f"it again would overwrite it. Use it as it is (CKPT={ckpt_dir}), or "
                         "pass run_name=<another name> to train a new one")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    cfg.trainer.precision = resolve_precision(cfg.trainer)  # saved and logged as resolved
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # a killed save leaves its temporary file
        for stale in ckpt_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    write_text_atomic(ckpt_dir / CONFIG_FILE, to_yaml(cfg))

    rng = np.random.default_rng(cfg.seed)
    monitor = torch.from_numpy(images[rng.permutation(len(images))[: cfg.monitor.health_images]])
    module = method_class(cfg.method.name)(cfg, monitor)

    id_file = ckpt_dir / WANDB_ID_FILE  # the same W&B run continues when the run resumes
    if not id_file.exists():
        write_text_atomic(id_file, f"{name}-{uuid.uuid4().hex[:8]}")
    logger = WandbLogger(
        project=cfg.logger.project, name=name, id=id_file.read_text().strip(), resume="allow",
        save_dir=cfg.logger.dir, mode=wandb_mode(cfg.logger.mode), job_type="pretrain",
        config=OmegaConf.to_container(cfg, resolve=True))
    tr = cfg.trainer
    clock = TrainingClock()
    trainer = pl.Trainer(
        max_epochs=tr.max_epochs, accelerator=tr.accelerator,
        devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy,
        sync_batchnorm=tr.sync_batchnorm, precision=tr.precision, benchmark=tr.cudnn_benchmark,
        log_every_n_steps=tr.log_every_n_steps, limit_train_batches=tr.limit_train_batches,
        logger=logger, default_root_dir=ckpt_dir, plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                   enable_version_counter=False),  # last.ckpt every epoch
                   LearningRateMonitor(logging_interval="step"), clock, StepSeeds(cfg.seed),
                   *time_limits(tr.max_time, tr.time_budget, cap_interval="epoch")])
    if tr.channels_last:
        module = module.to(memory_format=torch.channels_last)

    last = ckpt_dir / LAST_FILE
    resume_from = last if last.exists() else None
    commit = git_commit()  # the code this run starts with, even if the tree changes meanwhile
    trainer.fit(module, make_loader(cfg, images), ckpt_path=resume_from)
    wall, wall_all = clock.this_invocation, clock.seconds
    # by steps: Lightning advances current_epoch past an epoch a timer stopped part-way
    steps_configured = int(trainer.estimated_stepping_batches)
    epochs_completed = trainer.global_step // (steps_configured // tr.max_epochs)
    ended_by = ("epochs" if trainer.global_step >= steps_configured
                else "time budget" if budget_spent(trainer) else ENDED_BY_TIME_CAP)
    done = (f"{epochs_completed} of {tr.max_epochs} epochs (step {trainer.global_step} of "
            f"{steps_configured})")
    if ended_by == "time budget" and trainer.is_global_zero:
        print(f"\ntrainer.time_budget={tr.time_budget} ended {name} after {done}, its schedules "
              "annealed over that time, as configured. Running the command again trains no "
              "further.", flush=True)
    if ended_by == ENDED_BY_TIME_CAP and trainer.is_global_zero:
        print(f"\nWARNING: trainer.max_time={tr.max_time} stopped this invocation of {name} "
              f"after {done}: this backbone is NOT yet the one the command describes. Run the "
              "same command again to train the remaining steps (it resumes from last.ckpt, on "
              "the same schedule).", flush=True)
    if trainer.is_global_zero:
        export_backbone(module, cfg, ckpt_dir / BACKBONE_FILE)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        write_json_atomic(ckpt_dir / PROVENANCE_FILE, {
            "run_name": name, "method": cfg.method.name, "preset": cfg.preset,
            "backbone": cfg.backbone.name, "feature_dim": module.feature_dim,
            "epochs_completed": epochs_completed, "epochs_configured": tr.max_epochs,
            "ended_by": ended_by, "global_step": trainer.global_step,
            "steps_configured": steps_configured,
            "images": len(images), "wall_time_s": round(wall_all, 1),
            "wall_time_s_this_invocation": round(wall, 1),
            "resumed_from": str(resume_from) if resume_from else None,
            "git_commit": commit, "hardware": hardware(),
            "train_images_md5": FILES["train-images"].md5, "torch": torch.__version__,
            "wandb_run_id": logger.version, "final_metrics": metrics,
        })
        logger.experiment.summary.update({"wall_time_s": wall_all,
                                          "epochs_completed": epochs_completed})
        logger.experiment.finish()
        print(f"\nCheckpoint: {ckpt_dir / BACKBONE_FILE} ({epochs_completed} epochs, "
              f"{wall_all / 60:.1f} min). Probe it: make probe N=100 CKPT={ckpt_dir}")
    return ckpt_dir
