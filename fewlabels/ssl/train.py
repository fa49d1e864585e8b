"""``fewlabels pretrain``: fit a registered SSL method on the unlabeled training images and write
``checkpoints/<run>/{last.ckpt, backbone.safetensors, config.yaml, provenance.json}``."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset

from fewlabels.config import to_yaml
from fewlabels.data.fashion_mnist import FILES, load_train_images
from fewlabels.files import atomic_path, write_json_atomic, write_text_atomic
from fewlabels.ssl.augment import per_image_two_views
from fewlabels.ssl.registry import method_class
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
                          shuffle=True, drop_last=True, collate_fn=_as_batch,
                          pin_memory=torch.cuda.is_available())
    if data.augment == "per_image":
        return DataLoader(TwoViewImages(images, per_image_two_views(cfg.augment)),
                          batch_size=data.batch_size, shuffle=True, drop_last=True,
                          num_workers=data.num_workers,
                          persistent_workers=data.num_workers > 0)
    raise ValueError(f"data.augment={data.augment!r}: use 'batched' or 'per_image'")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file first: a killed run never leaves half a last.ckpt."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions natively (measured on this 2-core
    EPYC: 1.5x the fp32 images/s with channels_last, `make bench-precision`). Without them
    bf16 is emulated, so ``auto`` stays fp32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(trainer_cfg: DictConfig) -> str:
    """``trainer.precision=auto``: bf16-mixed where the hardware computes bf16 natively (a CUDA
    GPU that supports it, a CPU with AVX512-BF16/AMX); 16-mixed on an older CUDA GPU; 32-true on
    other CPUs. Other values pass as is."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    if trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def run_name(cfg: DictConfig) -> str:
    return cfg.run_name or f"{cfg.method.name}-{cfg.preset}-seed{cfg.seed}"


def export_backbone(module: pl.LightningModule, cfg: DictConfig, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.backbone.state_dict().items()}
    meta = {"feature_dim": str(module.feature_dim),
            "backbone": json.dumps(OmegaConf.to_container(cfg.backbone, resolve=True))}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def pretrain(cfg: DictConfig) -> Path:
    """Train (or resume) the run named by ``cfg``; returns its checkpoint folder."""
    pl.seed_everything(cfg.seed, workers=True)
    name = run_name(cfg)
    ckpt_dir = Path(cfg.checkpoint_dir) / name
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    cfg.trainer.precision = resolve_precision(cfg.trainer)  # saved and logged as resolved
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:  # a killed save leaves its temporary file
        for stale in ckpt_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    write_text_atomic(ckpt_dir / "config.yaml", to_yaml(cfg))

    images = load_train_images(cfg.data.dir).images[: cfg.data.limit]
    rng = np.random.default_rng(cfg.seed)
    monitor = torch.from_numpy(images[rng.permutation(len(images))[: cfg.monitor.health_images]])
    module = method_class(cfg.method.name)(cfg, monitor)

    id_file = ckpt_dir / "wandb_run_id"  # the same W&B run continues when the run resumes
    if not id_file.exists():
        write_text_atomic(id_file, f"{name}-{uuid.uuid4().hex[:8]}")
    logger = WandbLogger(
        project=cfg.logger.project, name=name, id=id_file.read_text().strip(), resume="allow",
        save_dir=cfg.logger.dir, mode=wandb_mode(cfg.logger.mode), job_type="pretrain",
        config=OmegaConf.to_container(cfg, resolve=True))
    tr = cfg.trainer
    trainer = pl.Trainer(
        max_epochs=tr.max_epochs, max_time=tr.max_time, accelerator=tr.accelerator,
        devices=tr.devices, num_nodes=tr.num_nodes, strategy=tr.strategy,
        sync_batchnorm=tr.sync_batchnorm, precision=tr.precision, benchmark=tr.cudnn_benchmark,
        log_every_n_steps=tr.log_every_n_steps, limit_train_batches=tr.limit_train_batches,
        logger=logger, default_root_dir=ckpt_dir, plugins=[AtomicCheckpointIO()],
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1,
                                   enable_version_counter=False),  # last.ckpt every epoch
                   LearningRateMonitor(logging_interval="step")])
    if tr.channels_last:
        module = module.to(memory_format=torch.channels_last)

    last = ckpt_dir / "last.ckpt"
    resume_from = last if last.exists() else None
    commit = _git_commit()  # the code this run starts with, even if the tree changes meanwhile
    started = time.time()
    trainer.fit(module, make_loader(cfg, images), ckpt_path=resume_from)
    wall = time.time() - started
    if trainer.is_global_zero:
        export_backbone(module, cfg, ckpt_dir / "backbone.safetensors")
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        write_json_atomic(ckpt_dir / "provenance.json", {
            "run_name": name, "method": cfg.method.name, "preset": cfg.preset,
            "backbone": cfg.backbone.name, "feature_dim": module.feature_dim,
            "epochs_completed": trainer.current_epoch, "global_step": trainer.global_step,
            "images": len(images), "wall_time_s_this_invocation": round(wall, 1),
            "resumed_from": str(resume_from) if resume_from else None,
            "git_commit": commit, "hardware": _hardware(),
            "train_images_md5": FILES["train-images"].md5, "torch": torch.__version__,
            "wandb_run_id": logger.version, "final_metrics": metrics,
        })
        logger.experiment.summary.update({"wall_time_s": wall,
                                          "epochs_completed": trainer.current_epoch})
        logger.experiment.finish()
        print(f"\nCheckpoint: {ckpt_dir}/backbone.safetensors ({trainer.current_epoch} epochs, "
              f"{wall / 60:.1f} min). Probe it: make probe N=100 CKPT={ckpt_dir}")
    return ckpt_dir
