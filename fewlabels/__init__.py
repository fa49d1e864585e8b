"""fewlabels: self-supervised pretraining on Fashion-MNIST, then probes that pay for every label."""

__version__ = "0.1.0"
