"""Fashion-MNIST: unlabeled training images and the labeled test set."""

from fewlabels.data.fashion_mnist import (
    CLASSES,
    MEAN,
    N_CLASSES,
    STD,
    DataFileError,
    TestSet,
    TrainImages,
    load_test_set,
    load_train_images,
)

__all__ = [
    "CLASSES", "MEAN", "N_CLASSES", "STD", "DataFileError", "TestSet", "TrainImages",
    "load_test_set", "load_train_images",
]
