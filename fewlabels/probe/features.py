"""Frozen-backbone features for the training and test images, cached per checkpoint hash."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import torch

from fewlabels.data.transforms import normalize_uint8
from fewlabels.files import atomic_path
from fewlabels.models.checkpoint import Checkpoint, load_backbone


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
        try:
            with np.load(cache, allow_pickle=False) as saved:
                if saved["meta"].item() == json.dumps({"sha256": ckpt.sha256}):
                    return saved["train"], saved["test"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            pass  # a truncated or damaged cache is computed again and replaced below
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backbone = load_backbone(ckpt)
    train = embed(backbone, train_images, batch_size, device)
    test = embed(backbone, test_images, batch_size, device)
    with atomic_path(cache) as tmp, open(tmp, "wb") as f:
        np.savez(f, train=train, test=test, meta=np.array(json.dumps({"sha256": ckpt.sha256})))
    return train, test
