"""Self-supervised pretraining on the unlabeled training images. Never sees a training label."""

from fewlabels.ssl.base import SSLMethod
from fewlabels.ssl.byol import BYOL
from fewlabels.ssl.simclr import SimCLR

# method.name -> LightningModule class: a new method is one file, one line here and one YAML in
# configs/method/.
METHODS: dict[str, type[SSLMethod]] = {"simclr": SimCLR, "byol": BYOL}


def method_class(name: str) -> type[SSLMethod]:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not known; known: {sorted(METHODS)}. "
                         "Add a file in fewlabels/ssl/, a line in METHODS and a YAML in "
                         "configs/method/.")
    return METHODS[name]


__all__ = ["METHODS", "BYOL", "SSLMethod", "SimCLR", "method_class"]
