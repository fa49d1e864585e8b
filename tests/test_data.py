import dataclasses
import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

import fewlabels.data as data_api
from fewlabels.data import fashion_mnist as fm


def test_training_view_is_images_and_ids_only():
    train = fm.load_train_images()
    assert [f.name for f in dataclasses.fields(train)] == ["images", "ids"]
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert np.array_equal(train.ids, np.arange(60000))
    assert not any("label" in name for name in data_api.__all__ if name != "TestSet")


def test_test_set_has_labels_for_evaluation():
    test = fm.load_test_set()
    assert test.images.shape == (10000, 28, 28)
    assert np.array_equal(np.bincount(test.labels), np.full(10, 1000))


def test_cached_arrays_match_the_official_checksums():
    for name in ("train-images", "test-images", "test-labels"):
        array = fm.load_array(name)
        raw = fm._header(fm.FILES[name]) + array.tobytes()
        assert hashlib.md5(raw).hexdigest() == fm.FILES[name].md5


def _isolated_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """Point the loader at a private folder holding one official file and no cache."""
    src = fm.locate(name)
    folder = tmp_path / "idx"
    folder.mkdir(parents=True)
    shutil.copyfile(src, folder / src.name)
    monkeypatch.setenv("FASHION_MNIST_DIR", str(folder))
    monkeypatch.setenv("FEWLABELS_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    return folder / src.name


def _rewrite(path: Path, change) -> None:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:
        f.write(change(raw))


def test_corrupted_copy_fails_its_checksum(tmp_path, monkeypatch):
    path = _isolated_copy(tmp_path, monkeypatch, "test-labels")
    _rewrite(path, lambda raw: raw[:100] + bytes([(raw[100] + 1) % 10]) + raw[101:])
    with pytest.raises(fm.DataFileError, match=r"MD5 .* does not match the official 15d4843"):
        fm.load_array("test-labels")
    assert not (tmp_path / "data" / "cache" / "test-labels.npy").exists()


def test_truncated_file_is_named_with_expected_shape(tmp_path, monkeypatch):
    path = _isolated_copy(tmp_path, monkeypatch, "test-labels")
    _rewrite(path, lambda raw: raw[:5000])
    with pytest.raises(fm.DataFileError,
                       match=r"t10k-labels.*expected shape \(10000,\).*truncated"):
        fm.load_array("test-labels")


def test_broken_gzip_and_wrong_magic(tmp_path, monkeypatch):
    path = _isolated_copy(tmp_path, monkeypatch, "test-labels")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(fm.DataFileError, match="not a readable gzip file"):
        fm.load_array("test-labels")
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(fm.DataFileError, match="magic number is 2051, expected 2049"):
        fm.load_array("test-labels")


def test_cache_is_used_and_a_bad_cache_is_rebuilt(tmp_path, monkeypatch):
    _isolated_copy(tmp_path, monkeypatch, "test-labels")
    first = fm.load_array("test-labels")
    cache = tmp_path / "data" / "cache" / "test-labels.npy"
    assert cache.is_file()
    monkeypatch.setattr(fm, "decode", lambda *a: pytest.fail("cache ignored"))
    assert np.array_equal(fm.load_array("test-labels"), first)
    monkeypatch.undo()
    _isolated_copy(tmp_path / "again", monkeypatch, "test-labels")
    cache = tmp_path / "again" / "data" / "cache" / "test-labels.npy"
    cache.parent.mkdir(parents=True)
    np.save(cache, np.zeros(10000, dtype=np.uint8))  # right shape, wrong content
    assert np.array_equal(fm.load_array("test-labels"), first)


def test_missing_files_are_downloaded_and_verified(tmp_path, monkeypatch):
    src = fm.locate("test-labels").parent
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    monkeypatch.setenv("FEWLABELS_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(fm, "SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("FASHION_MNIST_URL", src.as_uri())
    labels = fm.load_array("test-labels")
    assert (tmp_path / "data" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").is_file()
    assert labels.shape == (10000,)
    monkeypatch.setenv("FASHION_MNIST_URL", (tmp_path / "empty").as_uri())
    with pytest.raises(fm.DataFileError, match="could not be downloaded.*dataset-fashion-mnist"):
        fm.read_train_labels_for_label_database()
    assert not list((tmp_path / "data" / "fashion-mnist").glob("train-labels*"))


def test_the_training_labels_have_one_reader(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWLABELS_DATA", str(tmp_path / "data"))
    with pytest.raises(ValueError, match="label database alone"):
        fm.load_array("train-labels")
    assert not (tmp_path / "data" / "cache" / "train-labels.npy").exists()
