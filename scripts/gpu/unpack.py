"""Bring a GPU check's files (what scripts/gpu/run.sh left in $OUT) into this checkout.

Joins the backbone parts and checks their SHA-256, then places ``checkpoints/<run>/``
(backbone.safetensors, config.yaml, provenance.json), ``results/`` (bench, probe results and
``labels-device.sqlite``, the device's label database with every query it made) and ``wandb/``
(offline runs: ``wandb sync`` uploads them). Existing files are not overwritten.
Usage: python scripts/gpu/unpack.py /work/.device/<call>/files
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", type=Path, help="the folder holding results.tar.gz")
    parser.add_argument("--into", type=Path, default=REPO, help="the checkout (default: this)")
    args = parser.parse_args()
    tarball = args.files / "results.tar.gz"
    if not tarball.is_file():
        sys.exit(f"gpu-unpack: {tarball} is missing; pass the folder the device call returned")

    args.into.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.into) as tmp:
        staging = Path(tmp)
        with tarfile.open(tarball) as tar:
            members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
            tar.extractall(staging, members=members, filter="data")
        parts = sorted(args.files.glob("backbone.safetensors.part-*"),  # split -d: 00..89, 9000..
                       key=lambda p: int(p.name.rsplit("-", 1)[1]))
        if parts:
            expected = (args.files / "backbone.sha256").read_text().split()[0]
            digest = hashlib.sha256()
            ckpt = next(staging.glob("checkpoints/*"), None)
            if ckpt is None:
                sys.exit("gpu-unpack: backbone parts came back but no checkpoints/<run>/ folder")
            with open(ckpt / "backbone.safetensors", "wb") as joined:
                for part in parts:
                    data = part.read_bytes()
                    digest.update(data)
                    joined.write(data)
            if digest.hexdigest() != expected:
                sys.exit(f"gpu-unpack: the joined backbone's SHA-256 is {digest.hexdigest()}, "
                         f"not {expected}: a part is missing or damaged; fetch the files again")
        placed, kept = 0, 0
        for source in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = args.into / source.relative_to(staging)
            if target.exists():
                kept += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(source, target)
            placed += 1
    print(f"placed {placed} files in {args.into} ({kept} already there, left as they were)")


if __name__ == "__main__":
    main()
