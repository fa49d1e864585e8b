"""Self-supervised pretraining on the unlabeled training images. Never sees a training label."""

from fewlabels.ssl.registry import METHODS, method_class, register

__all__ = ["METHODS", "method_class", "register"]
