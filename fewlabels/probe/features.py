"""Frozen-backbone features for the training and test images, cached per checkpoint hash."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from fewlabels.files import atomic_path, sha256_file
from fewlabels.ssl.augment import normalize_uint8
from fewlabels.ssl.backbones import build_backbone


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupted."""


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    name: str
    sha256: str


def newest_checkpoint(checkpoint_dir: str | Path) -> Path:
    found = sorted(Path(checkpoint_dir).glob("*/backbone.safetensors"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"no checkpoint under {checkpoint_dir}/ (no */backbone.safetensors)"
                              ": run 'make pretrain' first, or pass CKPT=<folder>")
    return found[-1].parent


def open_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    for name in ("backbone.safetensors", "config.yaml"):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: {folder} is not a finished "
                                  "pretraining run (make pretrain writes both files)")
    return Checkpoint(folder.resolve(), folder.resolve().name,
                      sha256_file(folder / "backbone.safetensors"))


def load_backbone(ckpt: Checkpoint) -> torch.nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = OmegaConf.load(ckpt.folder / "config.yaml")
    backbone = build_backbone(cfg.backbone)
    try:
        state = load_file(str(ckpt.folder / "backbone.safetensors"))
        backbone.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{ckpt.folder / 'backbone.safetensors'} cannot be loaded ({err}); "
                              "the file is corrupted or from another backbone. Re-export it "
                              "with 'make pretrain' (it resumes from last.ckpt).") from err
    return backbone.eval()


@torch.no_grad()
def embed(backbone: torch.nn.Module, images: np.ndarray, batch_size: int,
          device: str) -> np.ndarray:
    backbone = backbone.to(device)
    tensor = torch.from_numpy(images)
    return torch.cat([backbone(normalize_uint8(chunk.to(device))).float().cpu()
                      for chunk in tensor.split(batch_size)]).numpy()


def features(ckpt: Checkpoint, train_images: np.ndarray, test_images: np.ndarray,
             batch_size: int = 1024, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(train, test) features; reused from ``<ckpt>/features/<sha256>.npz`` when present."""
    cache = ckpt.folder / "features" / f"{ckpt.sha256[:20]}-{len(train_images)}.npz"
    if cache.is_file():
        with np.load(cache) as saved:
            if saved["meta"].item() == json.dumps({"sha256": ckpt.sha256}):
                return saved["train"], saved["test"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(ckpt)
    train = embed(backbone, train_images, batch_size, device)
    test = embed(backbone, test_images, batch_size, device)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, train=train, test=test, meta=np.array(json.dumps({"sha256": ckpt.sha256})))
    return train, test
