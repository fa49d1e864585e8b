import pytest
import torch
from omegaconf import OmegaConf

from fewlabels.config import compose
from fewlabels.models.backbones import NarrowResNet, build_backbone


def test_timm_resnet18_takes_one_channel_with_a_small_stem():
    cfg = compose("pretrain", ["preset=gpu"]).backbone
    backbone = build_backbone(cfg)
    assert backbone.conv1.in_channels == 1 and backbone.conv1.stride == (1, 1)
    assert backbone.conv1.kernel_size == (3, 3) and isinstance(backbone.maxpool, torch.nn.Identity)
    assert backbone(torch.zeros(2, 1, 28, 28)).shape == (2, backbone.num_features) == (2, 512)


def test_narrow_resnet_widths_and_errors():
    cfg = compose("pretrain", ["preset=cpu"]).backbone
    backbone = build_backbone(cfg)
    assert isinstance(backbone, NarrowResNet) and backbone.num_features == 256
    assert backbone(torch.zeros(3, 1, 28, 28)).shape == (3, 256)
    with pytest.raises(ValueError, match="same length"):
        NarrowResNet([8, 16], [1])
    bad = OmegaConf.merge(cfg, {"name": "resnet18"})
    with pytest.raises(ValueError, match="timm:<model>"):
        build_backbone(bad)
