"""Fashion-MNIST from the four official IDX files, verified, decoded once and cached.

The training split is exposed as images and integer ids only. Its labels are read by one
function, :func:`read_train_labels_for_label_database`, whose only caller is the label
database (``fewlabels.oracle``). The test split comes with its labels, for evaluation only.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewlabels.files import atomic_path

CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
N_CLASSES = len(CLASSES)
MEAN, STD = 0.2860, 0.3530  # pixel statistics of the training images, scaled to [0, 1]
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class IdxFile:
    filename: str
    md5: str  # of the uncompressed IDX file
    magic: int
    shape: tuple[int, ...]


FILES = {
    "train-images": IdxFile("train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a",
                            2051, (60000, 28, 28)),
    "train-labels": IdxFile("train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9",
                            2049, (60000,)),
    "test-images": IdxFile("t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a",
                           2051, (10000, 28, 28)),
    "test-labels": IdxFile("t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965",
                           2049, (10000,)),
}


class DataFileError(RuntimeError):
    """A Fashion-MNIST file is missing, truncated or not the official one."""


@dataclass(frozen=True)
class TrainImages:
    """The unlabeled training split: uint8 images [N, 28, 28] and their ids (0..59999)."""

    images: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class TestSet:
    """The test split with labels. Only evaluation code may read ``labels``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def data_root() -> Path:
    return Path(os.environ.get("FEWLABELS_DATA", "data"))


def candidate_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where the IDX files are looked for, in order."""
    dirs = []
    explicit = data_dir or os.environ.get("FASHION_MNIST_DIR")
    if explicit:
        dirs.append(Path(explicit))
    dirs += [data_root() / "fashion-mnist", SYSTEM_DIR]
    return dirs


def locate(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Path of the ``.gz`` file for ``name``; downloads the official file if no copy is found."""
    spec = FILES[name]
    for directory in candidate_dirs(data_dir):
        if (directory / spec.filename).is_file():
            return directory / spec.filename
    return download(name, data_root() / "fashion-mnist")


def download(name: str, directory: Path) -> Path:
    """Fetch one official file (``FASHION_MNIST_URL`` overrides the base URL) and verify it."""
    from tqdm import tqdm

    spec = FILES[name]
    url = os.environ.get("FASHION_MNIST_URL", OFFICIAL_URL).rstrip("/") + "/" + spec.filename
    target = directory / spec.filename
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(target) as tmp:
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                               desc=spec.filename, file=sys.stderr) as bar:
                while block := response.read(1 << 16):
                    out.write(block)
                    bar.update(len(block))
            decode(tmp, spec)  # refuse to keep a bad download
    except OSError as err:
        raise DataFileError(
            f"{spec.filename} was not found in {[str(d) for d in candidate_dirs()]} and could "
            f"not be downloaded from {url}: {err}. Install the Debian package "
            "'dataset-fashion-mnist' or set FASHION_MNIST_DIR to a folder holding the official "
            "files."
        ) from err
    return target


def _header(spec: IdxFile) -> bytes:
    return struct.pack(f">I{len(spec.shape)}I", spec.magic, *spec.shape)


def decode(path: Path, spec: IdxFile) -> np.ndarray:
    """Decompress and check magic number, shape and MD5 of one IDX file."""
    fix = (
        f"Delete it and run 'make setup' again, or point FASHION_MNIST_DIR at a folder "
        f"holding the official {spec.filename}."
    )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataFileError(f"{path} is not a readable gzip file ({err}). {fix}") from err
    header = _header(spec)
    if len(raw) < 4 or raw[:4] != header[:4]:
        got = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
        raise DataFileError(f"{path}: IDX magic number is {got}, expected {spec.magic}. {fix}")
    if raw[: len(header)] != header or len(raw) != len(header) + int(np.prod(spec.shape)):
        raise DataFileError(
            f"{path}: expected shape {spec.shape} ({len(header) + int(np.prod(spec.shape))} "
            f"bytes uncompressed), got {len(raw)} bytes. The file is truncated or not "
            f"Fashion-MNIST. {fix}"
        )
    md5 = hashlib.md5(raw).hexdigest()
    if md5 != spec.md5:
        raise DataFileError(f"{path}: MD5 {md5} does not match the official {spec.md5}. {fix}")
    return np.frombuffer(raw, dtype=np.uint8, offset=len(header)).reshape(spec.shape).copy()


def _cache_is_valid(array: np.ndarray, spec: IdxFile) -> bool:
    if array.dtype != np.uint8 or array.shape != spec.shape:
        return False
    digest = hashlib.md5(_header(spec))
    digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest() == spec.md5


def load_array(name: str, data_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """One verified array; decoded ``.npy`` cache under ``data/cache`` checked against the MD5.
    Not for the training labels: the label database alone reads those."""
    if name == "train-labels":
        raise ValueError("the training labels are read by the label database alone: ask "
                         "fewlabels.oracle.Oracle for the labels of the ids you choose")
    spec = FILES[name]
    cache = data_root() / "cache" / f"{name}.npy"
    if cache.is_file():
        try:
            array = np.load(cache, allow_pickle=False)
            if _cache_is_valid(array, spec):
                return array
        except (OSError, ValueError):
            pass  # a bad cache is rebuilt from the source file below
    array = decode(locate(name, data_dir), spec)
    try:
        with atomic_path(cache) as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    except OSError:
        pass  # a read-only data folder only costs speed
    return array


def load_train_images(data_dir: str | os.PathLike[str] | None = None) -> TrainImages:
    images = load_array("train-images", data_dir)
    return TrainImages(images=images, ids=np.arange(len(images), dtype=np.int64))


def load_test_set(data_dir: str | os.PathLike[str] | None = None) -> TestSet:
    return TestSet(images=load_array("test-images", data_dir),
                   labels=load_array("test-labels", data_dir).astype(np.int64))


def read_train_labels_for_label_database(
    data_dir: str | os.PathLike[str] | None = None,
) -> np.ndarray:
    """Training labels. Called by ``fewlabels.oracle`` alone, to fill the label database."""
    return decode(locate("train-labels", data_dir), FILES["train-labels"]).astype(np.int64)


def prepare(data_dir: str | os.PathLike[str] | None = None) -> None:
    """Locate (or download), verify and cache all four files. Used by ``make setup``."""
    for name in ("train-images", "test-images", "test-labels"):
        load_array(name, data_dir)
    read_train_labels_for_label_database(data_dir)

