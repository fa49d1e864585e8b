import numpy as np
import torch
from PIL import Image

from fewlabels.config import compose
from fewlabels.data import MEAN, STD, load_train_images
from fewlabels.data.transforms import BatchedTwoViews, normalize_uint8, per_image_two_views


def _augment() -> BatchedTwoViews:
    return BatchedTwoViews.from_config(compose("pretrain", ["preset=tiny"]).augment)


def test_batched_views_are_per_sample():
    torch.manual_seed(0)
    image = torch.from_numpy(load_train_images().images[:1])
    view_a, view_b = _augment()(image.repeat(32, 1, 1))  # the same image 32 times
    assert view_a.shape == (32, 1, 28, 28) and torch.isfinite(view_a).all()
    assert not torch.allclose(view_a, view_b)  # two views of one image differ
    distinct = {tuple(v.flatten()[::37].round(decimals=3).tolist()) for v in view_a}
    assert len(distinct) >= 30  # each copy got its own crop, flip and jitter


def test_batched_views_keep_images_recognisable_and_normalized():
    torch.manual_seed(0)
    images = torch.from_numpy(load_train_images().images[:512])
    view_a, _ = _augment()(images)
    clean = normalize_uint8(images)
    assert abs(clean.mean().item()) < 0.05 and abs(clean.std().item() - 1) < 0.05
    assert view_a.min() >= (0 - MEAN) / STD - 1e-5 and view_a.max() <= (1 - MEAN) / STD + 1e-5
    # views stay closer to their own image than to other images
    own = (view_a - clean).pow(2).mean(dim=(1, 2, 3))
    other = (view_a - clean.roll(1, dims=0)).pow(2).mean(dim=(1, 2, 3))
    assert (own < other).float().mean() > 0.6


def test_lightly_per_image_transform_keeps_one_channel():
    transform = per_image_two_views(compose("pretrain", ["preset=tiny"]).augment)
    image = Image.fromarray(load_train_images().images[0], mode="L")
    views = transform(image)
    assert len(views) == 2 and all(v.shape == (1, 28, 28) for v in views)
    assert not np.allclose(views[0].numpy(), views[1].numpy())
