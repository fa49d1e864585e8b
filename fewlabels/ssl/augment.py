"""Two-view augmentations for 28x28 grayscale: random resized crop, horizontal flip,
brightness/contrast jitter, then Fashion-MNIST's own normalization. One channel throughout;
no hue, saturation, grayscale or blur (meaningless or harmful at this size).

Two implementations of the same operations:
- :class:`BatchedTwoViews`: whole uint8 batches on the training device, with independent random
  parameters per sample (crop through ``affine_grid``/``grid_sample``);
- :func:`per_image_two_views`: lightly's ``SimCLRTransform`` on PIL images in DataLoader workers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewlabels.data import MEAN, STD


def normalize_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 28, 28] or [B, 1, 28, 28] -> normalized float [B, 1, 28, 28]."""
    x = images.unsqueeze(1) if images.dim() == 3 else images
    return (x.float() / 255.0 - MEAN) / STD


class BatchedTwoViews(nn.Module):
    def __init__(self, crop_scale: tuple[float, float], crop_ratio: tuple[float, float],
                 hflip_prob: float, jitter_prob: float, brightness: float,
                 contrast: float) -> None:
        super().__init__()
        self.crop_scale, self.crop_ratio = tuple(crop_scale), tuple(crop_ratio)
        self.hflip_prob, self.jitter_prob = hflip_prob, jitter_prob
        self.brightness, self.contrast = brightness, contrast

    @classmethod
    def from_config(cls, cfg: Any) -> BatchedTwoViews:
        return cls(cfg.crop_scale, cfg.crop_ratio, cfg.hflip_prob, cfg.jitter_prob,
                   cfg.brightness, cfg.contrast)

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(n, device=like.device).uniform_(low, high)

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """One augmented view of float images in [0, 1], shape [B, 1, H, W]."""
        n = x.shape[0]
        area = self._uniform(n, *self.crop_scale, like=x)
        log_ratio = self._uniform(n, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]),
                                  like=x)
        ratio = log_ratio.exp()
        width = (area * ratio).sqrt().clamp(max=1.0)  # fractions of the image side
        height = (area / ratio).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, device=x.device) * 2 - 1) * (1 - width)
        cy = (torch.rand(n, device=x.device) * 2 - 1) * (1 - height)
        flip = torch.where(torch.rand(n, device=x.device) < self.hflip_prob, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0], theta[:, 0, 2] = width * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = height, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        jitter = (torch.rand(n, device=x.device) < self.jitter_prob).float()
        b = 1 + jitter * self._uniform(n, -self.brightness, self.brightness, like=x)
        c = 1 + jitter * self._uniform(n, -self.contrast, self.contrast, like=x)
        b, c = b.view(-1, 1, 1, 1), c.view(-1, 1, 1, 1)
        out = out * b
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * c + mean).clamp(0.0, 1.0)
        return (out - MEAN) / STD

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.unsqueeze(1) if images.dim() == 3 else images
        x = x.float() / 255.0
        return self.view(x), self.view(x)


def per_image_two_views(cfg: Any) -> Any:
    """lightly's SimCLR two-view transform, configured for 1-channel 28x28 Fashion-MNIST."""
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(
        input_size=28, cj_prob=cfg.jitter_prob, cj_strength=1.0, cj_bright=cfg.brightness,
        cj_contrast=cfg.contrast, cj_sat=0.0, cj_hue=0.0, min_scale=cfg.crop_scale[0],
        random_gray_scale=0.0, gaussian_blur=0.0, hf_prob=cfg.hflip_prob, vf_prob=0.0,
        rr_prob=0.0, normalize={"mean": [MEAN], "std": [STD]},
    )
