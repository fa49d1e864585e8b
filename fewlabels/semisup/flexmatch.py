"""FlexMatch (Zhang et al., 2021): FixMatch with class-wise thresholds from curriculum pseudo
labeling. A class whose pseudo-labels are still rare (on Fashion-MNIST: Shirt, the class the
others are confused with) gets a lower threshold, so that it is not starved of unlabeled images.

Each pool image remembers the last class it was confidently (>= ``threshold``) predicted as;
a class's learning effect is its count of such images, divided by the largest count, the images
never yet confidently predicted included (the threshold warm-up). Its threshold is
``threshold * e / (2 - e)`` (the convex mapping). Uses no hidden label.
"""

from __future__ import annotations

from typing import Any

import torch

from fewlabels.semisup.fixmatch import FixMatch


class FlexMatch(FixMatch):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # -1: never confidently predicted. Part of the state, so a resumed run keeps it.
        self.register_buffer("selected_label",
                             torch.full((len(self.pool_images),), -1, dtype=torch.long))

    def class_thresholds(self) -> torch.Tensor:
        n_classes = self.model.head.out_features
        counts = torch.bincount(self.selected_label + 1, minlength=n_classes + 1).float()
        effect = counts[1:] / counts.max().clamp_min(1)  # counts[0]: not yet selected
        return self.settings.threshold * effect / (2 - effect)

    def pseudo_label_mask(self, confidence: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
        mask = confidence >= self.class_thresholds().to(confidence.device)[pseudo]
        if self.ulb_idx is not None:  # the curriculum: remember the confident predictions
            confident = (confidence >= self.settings.threshold).cpu()
            self.selected_label[self.ulb_idx[confident].to(self.selected_label.device)] = \
                pseudo.cpu()[confident].to(self.selected_label.device)
        return mask

    def threshold_logs(self) -> dict[str, Any]:
        return {f"threshold/class_{c}": t for c, t in enumerate(self.class_thresholds())}

    def train_step(self, *args: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, logs = super().train_step(*args)
        return loss, {**logs, **self.threshold_logs()}
