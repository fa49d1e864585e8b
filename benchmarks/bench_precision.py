"""Images/s of the shipped pretraining step (bench_pretrain's (a)) for each precision and memory
format, measured side by side in one run: the variants take turns, and each is the median of
``--repeats`` runs. Prints each variant's ratio to fp32 with NCHW tensors.
Usage: python benchmarks/bench_precision.py [--preset cpu|gpu] [--steps 25] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import trainer_rate  # noqa: E402

from fewlabels.config import compose  # noqa: E402
from fewlabels.data import load_train_images  # noqa: E402

VARIANTS = {
    "fp32, NCHW": ["trainer.precision=32-true", "trainer.channels_last=false"],
    "fp32, channels_last": ["trainer.precision=32-true", "trainer.channels_last=true"],
    "bf16-mixed, NCHW": ["trainer.precision=bf16-mixed", "trainer.channels_last=false"],
    "bf16-mixed, channels_last": ["trainer.precision=bf16-mixed", "trainer.channels_last=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images = load_train_images().images
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, overrides in VARIANTS.items():
            cfg = compose("pretrain", [f"preset={args.preset}", *overrides])
            rates[name].append(trainer_rate(cfg, images, args.steps, args.warmup))
    base = statistics.median(rates["fp32, NCHW"])
    print(f"\npreset={args.preset}, {args.steps} steps after {args.warmup} warm-up, median of "
          f"{args.repeats} runs taking turns")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"{name:<27} {median:8.0f} img/s  {median / base:5.2f}x   "
              f"(runs: {', '.join(f'{v:.0f}' for v in values)})")


if __name__ == "__main__":
    main()
