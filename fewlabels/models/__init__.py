"""Networks and the checkpoint folder contract, shared by every stage (pretraining, probes,
fine-tuning)."""

from fewlabels.models.backbones import BACKBONES, NarrowResNet, build_backbone
from fewlabels.models.checkpoint import (
    BACKBONE_FILE,
    CLASSIFIER_FILE,
    CONFIG_FILE,
    FINETUNED_DIR,
    LAST_FILE,
    PROVENANCE_FILE,
    Checkpoint,
    CheckpointError,
    Classifier,
    load_backbone,
    load_classifier,
    newest_checkpoint,
    open_checkpoint,
    save_weights,
)

__all__ = [
    "BACKBONES", "BACKBONE_FILE", "CLASSIFIER_FILE", "CONFIG_FILE", "FINETUNED_DIR", "LAST_FILE",
    "PROVENANCE_FILE", "Checkpoint", "CheckpointError", "Classifier", "NarrowResNet",
    "build_backbone", "load_backbone", "load_classifier", "newest_checkpoint", "open_checkpoint",
    "save_weights",
]
