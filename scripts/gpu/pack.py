"""Pack what the GPU check (scripts/gpu/run.sh) needs on the device machine into ``.devkit/``.

The device machine reaches no registry and has its own Python (3.12) with PyTorch, Lightning,
timm and safetensors, but not all of this project's dependencies. This writes, here:

- ``.devkit/whl/``: a wheel for every installed dependency of ``fewlabels`` (walked from the
  installed metadata) that the device image lacks, at the version installed here, for CPython
  3.12 on x86-64 Linux; a pure-Python package published only as an sdist is built into a wheel;
- ``.devkit/data/``: the four official Fashion-MNIST files, checked against their MD5s;
- ``.devkit/manifest.json``: the git commit, the wheels and the data files with their sizes.

``.devkit/`` is git-ignored, so the device call must name it in ``carry``. Usage (here):
``make gpu-pack`` or ``python scripts/gpu/pack.py [--out .devkit]``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DEVICE_PACKAGES = HERE / "device-packages.txt"
DEVICE_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
CARRY_LIMIT = 60 * 2**20  # the device call carries 64 MiB with the working tree
# On the device image too, but at versions unknown here, and pydantic and wandb's exporters need
# recent ones: carry the versions tested together here.
CARRY_ANYWAY = {"typing-extensions", "protobuf"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def device_packages() -> set[str]:
    lines = DEVICE_PACKAGES.read_text().splitlines()
    return {canonical(line) for line in lines if line.strip() and not line.startswith("#")}


def missing_on_device(root: str = "fewlabels") -> dict[str, str]:
    """{name: installed version} of ``root``'s runtime dependency closure not on the device."""
    env = default_environment() | {"python_version": DEVICE_PYTHON, "python_full_version":
                                   f"{DEVICE_PYTHON}.0", "sys_platform": "linux",
                                   "platform_system": "Linux", "platform_machine": "x86_64",
                                   "extra": ""}
    on_device, seen, missing = device_packages(), set(), {}
    stack = [root]
    while stack:
        name = canonical(stack.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            sys.exit(f"gpu-pack: {name} is required but not installed here; run 'make setup'")
        if name != canonical(root) and (name not in on_device or name in CARRY_ANYWAY):
            missing[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(env):
                stack.append(requirement.name)
    return dict(sorted(missing.items()))


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "-q", "--no-deps"],
                          capture_output=True, text=True)


def fetch_wheel(name: str, version: str, dest: Path) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    got = pip("download", "--only-binary=:all:", "--python-version", DEVICE_PYTHON,
              "--implementation", "cp", *platforms, "-d", str(dest), f"{name}=={version}")
    if got.returncode == 0:
        return
    built = pip("wheel", "--no-binary", name, "-w", str(dest), f"{name}=={version}")
    wheels = list(dest.glob(f"{re.sub('-', '_', name)}-{version}-*.whl"))
    if built.returncode != 0 or not wheels or not wheels[0].name.endswith("-none-any.whl"):
        sys.exit(f"gpu-pack: no wheel of {name}=={version} for CPython {DEVICE_PYTHON} on "
                 f"x86-64 Linux, and it does not build as pure Python:\n{got.stderr}"
                 f"{built.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / ".devkit")
    args = parser.parse_args()

    from fewlabels.data.fashion_mnist import FILES, decode, locate
    from fewlabels.files import write_json_atomic

    staging = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "whl").mkdir(parents=True)
    (staging / "data").mkdir()

    packages = missing_on_device()
    for name, version in packages.items():
        print(f"wheel  {name}=={version}")
        fetch_wheel(name, version, staging / "whl")
    for name, spec in FILES.items():
        source = locate(name)
        decode(source, spec)  # the official file, or an error that says what to do
        shutil.copy2(source, staging / "data" / spec.filename)
        print(f"data   {spec.filename}")

    files = sorted(p for p in staging.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    if total > CARRY_LIMIT:
        sys.exit(f"gpu-pack: {total / 2**20:.1f} MiB is more than the {CARRY_LIMIT / 2**20:.0f} "
                 "MiB a device call can carry; drop a dependency or carry the data separately")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip() or None
    write_json_atomic(staging / "manifest.json", {
        "git_commit": commit, "device_python": DEVICE_PYTHON, "packages": packages,
        "files": {str(p.relative_to(staging)): p.stat().st_size for p in files}})
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(f"\n{args.out}: {len(packages)} wheels and 4 data files, {total / 2**20:.1f} MiB. "
          f"On the device: run(command='bash scripts/gpu/run.sh', carry=['{args.out.name}'], "
          "timeout_s=580)")


if __name__ == "__main__":
    main()
