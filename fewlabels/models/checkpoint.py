"""The checkpoint folder contract, in one place for every stage.

A pretraining run writes ``checkpoints/<run>/``:

- ``last.ckpt``: Lightning's state, to resume;
- ``backbone.safetensors``: the weights probes and fine-tuning load. It describes itself: its
  metadata holds ``kind`` (``backbone``), ``feature_dim`` and the ``backbone`` config (JSON), so
  the network can be rebuilt from the file alone;
- ``config.yaml`` (resolved) and ``provenance.json``.

A fine-tuning run writes ``checkpoints/finetuned/<run>/`` with ``model.safetensors`` (kind
``classifier``: backbone + linear head, plus ``num_classes``), ``last.ckpt`` and ``config.yaml``.
The two kinds never mix: :func:`newest_checkpoint` looks only at ``checkpoints/*/`` folders whose
``backbone.safetensors`` says ``kind=backbone``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewlabels.files import atomic_path, sha256_file
from fewlabels.models.backbones import build_backbone

BACKBONE_FILE = "backbone.safetensors"
CLASSIFIER_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"
LAST_FILE = "last.ckpt"
WANDB_ID_FILE = "wandb_run_id"  # the W&B run a resumed run continues
FINETUNED_DIR = "finetuned"  # under the checkpoint folder: fine-tuned classifiers live apart

KIND_BACKBONE, KIND_CLASSIFIER = "backbone", "classifier"
# provenance.json's "ended_by" where trainer.max_time stopped a pretraining run short of its steps
ENDED_BY_TIME_CAP = "time cap"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupted."""


@dataclass(frozen=True)
class Checkpoint:
    """A finished pretraining run: its folder, name and the SHA-256 of its backbone file."""

    folder: Path
    name: str
    sha256: str

    @property
    def backbone_file(self) -> Path:
        return self.folder / BACKBONE_FILE


class Classifier(nn.Module):
    """Backbone + linear head: what fine-tuning trains and saves."""

    def __init__(self, backbone: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): the file is corrupted or not a "
                              "safetensors file. Re-export it: 'make pretrain' resumes from "
                              "last.ckpt and writes it again.") from err


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The metadata a weights file was saved with (``kind``, ``backbone``…)."""
    return _metadata(Path(path))


def kind_of(path: str | Path) -> str:
    """``backbone`` or ``classifier``; files from before the field existed are backbones."""
    return _metadata(Path(path)).get("kind", KIND_BACKBONE)


def newest_checkpoint(checkpoint_dir: str | Path) -> Path:
    """The most recently written pretrained backbone folder (never a fine-tuned classifier)."""
    found = sorted((p for p in Path(checkpoint_dir).glob(f"*/{BACKBONE_FILE}")
                    if p.parent.name != FINETUNED_DIR and kind_of(p) == KIND_BACKBONE),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise CheckpointError(f"no checkpoint under {checkpoint_dir}/ (no */{BACKBONE_FILE})"
                              ": run 'make pretrain' first, or pass CKPT=<folder>")
    return found[-1].parent


def _stopped_by_time_cap(folder: Path) -> bool:
    """Whether ``folder``'s ``provenance.json`` says ``trainer.max_time`` stopped its run short."""
    provenance = folder / PROVENANCE_FILE
    return (provenance.is_file()
            and json.loads(provenance.read_text()).get("ended_by") == ENDED_BY_TIME_CAP)


def pretraining_unfinished(folder: str | Path) -> bool:
    """Whether the pretraining run in ``folder`` has steps left that its ``last.ckpt`` resumes:
    killed before it exported (no ``provenance.json``) or stopped by ``trainer.max_time``
    (``"ended_by": "time cap"``). False without ``last.ckpt``: nothing there can resume."""
    folder = Path(folder)
    if not (folder / LAST_FILE).is_file():
        return False
    return not (folder / PROVENANCE_FILE).is_file() or _stopped_by_time_cap(folder)


def open_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    for name in (BACKBONE_FILE, CONFIG_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: {folder} is not a finished "
                                  "pretraining run (make pretrain writes both files)")
    if kind_of(folder / BACKBONE_FILE) != KIND_BACKBONE:
        raise CheckpointError(f"{folder / BACKBONE_FILE} is not a pretrained backbone; pass a "
                              "folder written by 'make pretrain'")
    if _stopped_by_time_cap(folder):
        raise CheckpointError(f"{folder} is a pretraining run that trainer.max_time stopped short "
                              f"of its steps ({PROVENANCE_FILE}: ended_by {ENDED_BY_TIME_CAP!r}), "
                              "not yet the backbone its command describes: run the same 'make "
                              f"pretrain' command again to finish it (it resumes from {LAST_FILE})"
                              ", or pass CKPT=<a finished backbone folder>")
    return Checkpoint(folder.resolve(), folder.resolve().name,
                      sha256_file(folder / BACKBONE_FILE))


def backbone_config(path: str | Path) -> dict[str, Any]:
    """The ``backbone`` config section stored in a weights file's metadata, else (a file written
    without it) the one in the ``config.yaml`` beside it."""
    from omegaconf import OmegaConf

    path = Path(path)
    meta = _metadata(path)
    if "backbone" in meta:
        return json.loads(meta["backbone"])
    config = path.parent / CONFIG_FILE
    try:
        return OmegaConf.to_container(OmegaConf.load(config).backbone, resolve=True)
    except Exception as err:  # noqa: BLE001 — any unreadable config is the same user problem
        raise CheckpointError(f"{path} does not describe its backbone and {config} cannot tell "
                              f"it ({err}); re-export it with 'make pretrain'") from err


def _load_state(module: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        module.load_state_dict(load_file(str(path)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as err:
        raise CheckpointError(f"{path} cannot be loaded ({err}); the file is corrupted or from "
                              "another network. Write it again with the command that made it "
                              "(it resumes from last.ckpt).") from err


def load_backbone(ckpt: Checkpoint) -> nn.Module:
    """The pretrained backbone, rebuilt from the file's own description, in eval mode."""
    from omegaconf import OmegaConf

    backbone = build_backbone(OmegaConf.create(backbone_config(ckpt.backbone_file)))
    _load_state(backbone, ckpt.backbone_file)
    return backbone.eval()


def save_weights(module: nn.Module, path: Path, kind: str, backbone_cfg: dict[str, Any],
                 feature_dim: int, **extra: str) -> None:
    """``module``'s state as safetensors with the metadata that lets a reader rebuild it."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    meta = {"kind": kind, "feature_dim": str(feature_dim), "backbone": json.dumps(backbone_cfg),
            **extra}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_classifier(path: str | Path) -> Classifier:
    """A fine-tuned classifier from its ``model.safetensors`` alone."""
    from omegaconf import OmegaConf

    path = Path(path)
    meta = _metadata(path)
    if meta.get("kind") != KIND_CLASSIFIER:
        raise CheckpointError(f"{path} is not a fine-tuned classifier (kind="
                              f"{meta.get('kind', KIND_BACKBONE)!r})")
    model = Classifier(build_backbone(OmegaConf.create(json.loads(meta["backbone"]))),
                       int(meta["num_classes"]))
    _load_state(model, path)
    return model.eval()
