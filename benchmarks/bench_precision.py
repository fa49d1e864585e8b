"""Images/s of the shipped pretraining step (bench_pretrain's (a)) for each precision and memory
format, measured side by side in one run: the variants take turns, and each is the median of
``--repeats`` runs. Prints each variant's ratio to fp32 with NCHW tensors.
Usage: python benchmarks/bench_precision.py [--preset cpu|gpu] [--steps 25] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import trainer_rate  # noqa: E402
from turns import median, parser, runs_text, take_turns  # noqa: E402

from fewlabels.config import compose  # noqa: E402
from fewlabels.data import load_train_images  # noqa: E402

VARIANTS = {
    "fp32, NCHW": ["trainer.precision=32-true", "trainer.channels_last=false"],
    "fp32, channels_last": ["trainer.precision=32-true", "trainer.channels_last=true"],
    "bf16-mixed, NCHW": ["trainer.precision=bf16-mixed", "trainer.channels_last=false"],
    "bf16-mixed, channels_last": ["trainer.precision=bf16-mixed", "trainer.channels_last=true"],
}


def main() -> None:
    args = parser(__doc__, steps=25).parse_args()
    images = load_train_images().images
    configs = {name: compose("pretrain", [f"preset={args.preset}", *overrides])
               for name, overrides in VARIANTS.items()}
    rates = take_turns({name: (lambda cfg=cfg: trainer_rate(cfg, images, args.steps,
                                                             args.warmup))
                        for name, cfg in configs.items()}, args.repeats)
    base = median(rates["fp32, NCHW"])
    print(f"\npreset={args.preset}, {args.steps} steps after {args.warmup} warm-up, median of "
          f"{args.repeats} runs taking turns")
    for name, values in rates.items():
        print(f"{name:<27} {median(values):8.0f} img/s  {median(values) / base:5.2f}x   "
              f"({runs_text(values)})")


if __name__ == "__main__":
    main()
