"""The GPU-check kit (scripts/gpu/): what it carries to the device, and how results come back."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts" / "gpu"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_carries_what_the_device_image_lacks():
    missing = load_script("pack").missing_on_device()
    for name in ("lightly", "wandb", "hydra-core", "omegaconf", "antlr4-python3-runtime"):
        assert name in missing, name
    for name in ("torch", "torchvision", "pytorch-lightning", "timm", "numpy", "fewlabels"):
        assert name not in missing, name
    assert {"typing-extensions", "protobuf"} <= set(missing)  # carried at tested versions


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def device_output(folder: Path, backbone: bytes, part_size: int = 7) -> None:
    """What scripts/gpu/run.sh leaves in $OUT: a tarball and the backbone in parts."""
    folder.mkdir()
    with tarfile.open(folder / "results.tar.gz", "w:gz") as tar:
        add(tar, "results/probe-run-random-n100-seed0.json", b"[]")
        add(tar, "checkpoints/run/config.yaml", b"seed: 0\n")
        link = tarfile.TarInfo("wandb/latest-run")
        link.type, link.linkname = tarfile.SYMTYPE, "/root/elsewhere"
        tar.addfile(link)
    for i in range(0, len(backbone), part_size):
        (folder / f"backbone.safetensors.part-{i // part_size:02d}").write_bytes(
            backbone[i:i + part_size])
    (folder / "backbone.sha256").write_text(
        f"{hashlib.sha256(backbone).hexdigest()}  backbone.safetensors\n")


def unpack(files: Path, into: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPTS / "unpack.py"), str(files),
                           "--into", str(into)], capture_output=True, text=True)


def test_unpack_joins_the_backbone_and_keeps_existing_files(tmp_path):
    backbone = bytes(range(256)) * 3
    device_output(tmp_path / "out", backbone)
    checkout = tmp_path / "checkout"
    (checkout / "results").mkdir(parents=True)
    (checkout / "results" / "probe-run-random-n100-seed0.json").write_text("mine")

    got = unpack(tmp_path / "out", checkout)
    assert got.returncode == 0, got.stderr
    assert (checkout / "checkpoints/run/backbone.safetensors").read_bytes() == backbone
    assert (checkout / "checkpoints/run/config.yaml").read_text() == "seed: 0\n"
    assert (checkout / "results/probe-run-random-n100-seed0.json").read_text() == "mine"
    assert not (checkout / "wandb/latest-run").exists()  # links are not followed or made
    assert "placed 2 files" in got.stdout and "1 already there" in got.stdout


def test_unpack_refuses_a_damaged_part(tmp_path):
    device_output(tmp_path / "out", b"weights" * 50)
    part = tmp_path / "out" / "backbone.safetensors.part-01"
    part.write_bytes(b"X" + part.read_bytes()[1:])
    got = unpack(tmp_path / "out", tmp_path / "checkout")
    assert got.returncode == 1
    assert "SHA-256" in got.stderr and "fetch the files again" in got.stderr
    assert not (tmp_path / "checkout" / "checkpoints").exists()  # nothing half-placed


@pytest.mark.parametrize("accuracies", [[0.5, 0.7, 0.6]])
def test_summary_means_over_seeds(tmp_path, accuracies):
    results = tmp_path / "results"
    results.mkdir()
    for seed, acc in enumerate(accuracies):
        row = {"strategy": "random", "n": 100, "probe": "linear", "seed": seed,
               "test_accuracy": acc, "n_queries": 100}
        (results / f"probe-run-random-n100-seed{seed}.json").write_text(json.dumps([row]))
    summary = load_script("summarize").probe_summary(results, "run")
    assert len(summary) == 1
    assert summary[0]["mean"] == pytest.approx(0.6)
    assert summary[0]["std"] == pytest.approx(0.1)  # sample std over the three seeds
    assert summary[0]["queries"] == 300 and summary[0]["accuracies"] == accuracies
