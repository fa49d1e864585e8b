"""Normalization and view policies for 28x28 grayscale, the one home every stage imports.

- :func:`normalize_uint8`: Fashion-MNIST's own mean/std, one channel.
- Pretraining, two views: random resized crop, horizontal flip, brightness/contrast jitter. No
  hue, saturation, grayscale or blur (meaningless or harmful at this size). Two implementations
  of the same operations: :class:`BatchedTwoViews` (whole uint8 batches on the training device,
  independent random parameters per sample, crop through ``affine_grid``/``grid_sample``) and
  :func:`per_image_two_views` (lightly's ``SimCLRTransform`` on PIL images in workers).
- Fine-tuning, :class:`WeakView` and :class:`StrongView` (FixMatch's two policies, batched on
  the device): weak = flip and a small translation; strong = a larger random affine (scale,
  rotation, shear, translation), flip, brightness/contrast/gamma, solarize or posterize, and a
  random erased square. The background of Fashion-MNIST is black, so pixels moved in from
  outside the image are 0.
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


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    x = images.unsqueeze(1) if images.dim() == 3 else images
    return x.float() / 255.0 if images.dtype == torch.uint8 else x.float()


def _affine(x: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor, shear: torch.Tensor,
            shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Per-sample affine warp of [B, 1, H, W]; ``scale`` > 1 zooms in; shift in image fractions."""
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0] = cos / scale * flip
    theta[:, 0, 1] = (-sin + shear) / scale
    theta[:, 1, 0] = sin / scale * flip
    theta[:, 1, 1] = cos / scale
    theta[:, :, 2] = shift * 2
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _signs(n: int, prob: float, device: torch.device) -> torch.Tensor:
    return torch.where(torch.rand(n, device=device) < prob, -1.0, 1.0)


class WeakView(nn.Module):
    """Flip and translate by up to ``translate`` of the side (FixMatch's weak view)."""

    def __init__(self, translate: float = 0.125, hflip_prob: float = 0.5) -> None:
        super().__init__()
        self.translate, self.hflip_prob = translate, hflip_prob

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_unit_float(images)
        n, dev = x.shape[0], x.device
        ones, zeros = torch.ones(n, device=dev), torch.zeros(n, device=dev)
        shift = (torch.rand(n, 2, device=dev) * 2 - 1) * self.translate
        out = _affine(x, ones, zeros, zeros, shift, _signs(n, self.hflip_prob, dev))
        return (out - MEAN) / STD


class StrongView(nn.Module):
    """A strong, label-preserving view for 28x28 grayscale clothes (FixMatch's strong view, with
    the RandAugment operations that mean something here, each with a random magnitude)."""

    def __init__(self, scale: tuple[float, float] = (0.8, 1.25), rotate_deg: float = 20.0,
                 shear: float = 0.25, translate: float = 0.15, hflip_prob: float = 0.5,
                 brightness: float = 0.5, contrast: float = 0.5, gamma: float = 0.5,
                 solarize_prob: float = 0.2, posterize_prob: float = 0.2,
                 erase_prob: float = 1.0, erase_size: tuple[float, float] = (0.2, 0.5)) -> None:
        super().__init__()
        self.scale, self.rotate, self.shear = tuple(scale), math.radians(rotate_deg), shear
        self.translate, self.hflip_prob = translate, hflip_prob
        self.brightness, self.contrast, self.gamma = brightness, contrast, gamma
        self.solarize_prob, self.posterize_prob = solarize_prob, posterize_prob
        self.erase_prob, self.erase_size = erase_prob, tuple(erase_size)

    @classmethod
    def from_config(cls, cfg: Any) -> StrongView:
        return cls(tuple(cfg.scale), cfg.rotate_deg, cfg.shear, cfg.translate, cfg.hflip_prob,
                   cfg.brightness, cfg.contrast, cfg.gamma, cfg.solarize_prob,
                   cfg.posterize_prob, cfg.erase_prob, tuple(cfg.erase_size))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _as_unit_float(images)
        n, dev = x.shape[0], x.device

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.empty(n, *shape, device=dev).uniform_(low, high)

        log_scale = uniform(math.log(self.scale[0]), math.log(self.scale[1]))
        out = _affine(x, log_scale.exp(), uniform(-self.rotate, self.rotate),
                      uniform(-self.shear, self.shear), uniform(-self.translate, self.translate, 2),
                      _signs(n, self.hflip_prob, dev))
        view = (-1, 1, 1, 1)
        out = out * (1 + uniform(-self.brightness, self.brightness)).view(view)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = ((out - mean) * (1 + uniform(-self.contrast, self.contrast)).view(view) + mean)
        out = out.clamp(0.0, 1.0) ** uniform(-self.gamma, self.gamma).exp().view(view)
        solarize = (torch.rand(n, device=dev) < self.solarize_prob).view(view)
        out = torch.where(solarize & (out > uniform(0.5, 1.0).view(view)), 1.0 - out, out)
        posterize = (torch.rand(n, device=dev) < self.posterize_prob).view(view)
        levels = (2 ** torch.randint(2, 5, (n,), device=dev)).float().view(view)
        out = torch.where(posterize, torch.floor(out * levels) / levels, out)
        return (self._erase(out) - MEAN) / STD

    def _erase(self, x: torch.Tensor) -> torch.Tensor:
        """Zero a random square per image (Cutout / random erasing)."""
        n, _, h, w = x.shape
        side = torch.empty(n, device=x.device).uniform_(*self.erase_size) * h
        cy, cx = torch.rand(n, device=x.device) * h, torch.rand(n, device=x.device) * w
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        half = (side / 2).view(n, 1, 1)
        inside = ((rows - cy.view(n, 1, 1)).abs() <= half) & ((cols - cx.view(n, 1, 1)).abs()
                                                               <= half)
        erase = (torch.rand(n, device=x.device) < self.erase_prob).view(n, 1, 1) & inside
        return x.masked_fill(erase.unsqueeze(1), 0.0)
