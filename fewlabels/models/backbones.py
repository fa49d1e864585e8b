"""Backbones for 28x28 single-channel images: timm ResNets with an adapted stem, and a narrow
ResNet for CPUs (timm's ResNet does not take widths below 64)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class NarrowResNet(nn.Module):
    """ResNet-18 layout with configurable widths; ``forward`` returns pooled features."""

    def __init__(self, widths: list[int], blocks: list[int], stem_kernel: int = 3,
                 stem_stride: int = 2, in_chans: int = 1) -> None:
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"backbone.widths {widths} and backbone.blocks {blocks} must be "
                             "non-empty lists of the same length")
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], stem_kernel, stem_stride, stem_kernel // 2, bias=False),
            nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        in_ch = widths[0]
        for stage, (width, n_blocks) in enumerate(zip(widths, blocks, strict=True)):
            for i in range(n_blocks):
                layers.append(BasicBlock(in_ch, width, 2 if stage > 0 and i == 0 else 1))
                in_ch = width
        self.layers = nn.Sequential(*layers)
        self.num_features = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


def _timm_backbone(name: str, stem_kernel: int, stem_stride: int, stem_pool: bool) -> nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False, in_chans=1, num_classes=0)
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d):  # ResNet family: small images want a small, gentle stem
        model.conv1 = nn.Conv2d(1, conv1.out_channels, stem_kernel, stem_stride,
                                stem_kernel // 2, bias=False)
        if not stem_pool and hasattr(model, "maxpool"):
            model.maxpool = nn.Identity()
    return model


def _narrow_resnet(cfg: Any) -> nn.Module:
    return NarrowResNet(list(cfg.widths), list(cfg.blocks), cfg.stem_kernel, cfg.stem_stride)


def _timm(cfg: Any) -> nn.Module:
    return _timm_backbone(cfg.name.removeprefix("timm:"), cfg.stem_kernel, cfg.stem_stride,
                          cfg.stem_pool)


# backbone.name -> builder; "timm:<model>" names any timm model (the part before the colon is
# the key).
BACKBONES: dict[str, Callable[[Any], nn.Module]] = {
    "narrow_resnet": _narrow_resnet,
    "timm": _timm,
}


def build_backbone(cfg: Any) -> nn.Module:
    """Backbone from a ``backbone`` config section; ``.num_features`` is the feature dimension."""
    name: str = cfg.name
    key = name.split(":", 1)[0]
    if key not in BACKBONES or (key == "timm") != name.startswith("timm:"):
        raise ValueError(f"backbone.name={name!r}: use 'narrow_resnet' or 'timm:<model>' "
                         "(e.g. timm:resnet18)")
    return BACKBONES[key](cfg)
