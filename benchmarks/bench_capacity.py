"""What a higher-capacity fine-tuned network costs per step, measured side by side in one run.

The fine-tuning step on ready views (the algorithm's train_step, backward, optimizer step: the
compute limit of ``bench_finetune.py``) for the preset's backbone and for variants of it, taking
turns (base, variant 1, variant 2, ..., base, ...); medians compared. Speed only: random labels,
no query, no accuracy. Prints each variant's images/s, its parameters and its cost per step
relative to the preset's backbone (base img/s / variant img/s).
Usage: python benchmarks/bench_capacity.py [--preset cpu|gpu] [--algorithm flexmatch]
           [--variant NAME=OVERRIDE[,OVERRIDE...] ...] [--steps 6] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import re

from bench_finetune import learner, ready_views
from omegaconf import OmegaConf
from turns import median, parser, runs_text, take_turns

from fewlabels.config import ConfigError, compose
from fewlabels.data import load_train_images
from fewlabels.files import write_json_atomic
from fewlabels.runtime import resolve_precision


def default_variants(backbone) -> dict[str, tuple[str, ...]]:
    """The preset's backbone and three ways to raise its capacity (Hydra overrides of it)."""
    def listed(values) -> str:
        return "[" + ",".join(str(v) for v in values) + "]"

    return {"base": (),
            "stride1-stem": ("backbone.stem_stride=1",),
            "2x-widths": (f"backbone.widths={listed(2 * w for w in backbone.widths)}",),
            "2x-blocks": (f"backbone.blocks={listed(2 * b for b in backbone.blocks)}",)}


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name or not overrides:
        raise SystemExit(f"--variant {text!r}: write NAME=OVERRIDE[,OVERRIDE...], e.g. "
                         "wide=backbone.widths=[64,128,256,512]")
    return name, tuple(o for o in re.split(r",(?![^\[]*\])", overrides) if o)  # not in [...]


def main() -> None:
    p = parser(__doc__, steps=6)
    p.add_argument("--algorithm", default="flexmatch")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=OVERRIDE[,OVERRIDE...]; replaces the built-in variants")
    args = p.parse_args()
    cfg = compose("finetune", [f"preset={args.preset}", f"algorithm={args.algorithm}"])
    variants = dict([("base", ())] + [parse_variant(v) for v in args.variant]) if args.variant \
        else default_variants(compose("pretrain", [f"preset={args.preset}"]).backbone)
    cfg.trainer.precision = resolve_precision(cfg.trainer)
    images = load_train_images().images
    per_step = learner(cfg, images[:300]).batches.images_per_step(args.algorithm != "supervised")
    try:  # builds every variant once, so a bad override fails before any timing
        params = {name: sum(q.numel() for q in learner(cfg, images[:300], o).model.parameters())
                  for name, o in variants.items()}
    except (ConfigError, ValueError) as error:
        raise SystemExit(f"--variant: {error}") from None
    runs = take_turns({name: (lambda o=o: per_step / ready_views(cfg, images, args.steps,
                                                                 args.warmup, o))
                       for name, o in variants.items()}, args.repeats)
    medians = {name: median(values) for name, values in runs.items()}
    print(f"\npreset={args.preset} algorithm={args.algorithm} images/step={per_step} "
          f"precision={cfg.trainer.precision} channels_last={cfg.trainer.channels_last} "
          f"steps={args.steps} (after {args.warmup} warm-up), median of {args.repeats} runs "
          "taking turns; cost = base img/s / variant img/s")
    for name, overrides in variants.items():
        cost = medians["base"] / medians[name]
        print(f"{name:>18}: {medians[name]:7.0f} img/s  cost {cost:5.2f}x"
              f"  {params[name] / 1e6:5.2f} M params  {' '.join(overrides) or '(the preset)'}"
              f"  ({runs_text(runs[name])})")
    if args.json:
        write_json_atomic(args.json, {
            "preset": args.preset, "algorithm": args.algorithm,
            "config": OmegaConf.to_container(cfg, resolve=True),
            "variants": {name: {"overrides": list(o), "img_s": runs[name],
                                "median": medians[name], "params": params[name],
                                "cost": medians["base"] / medians[name]}
                         for name, o in variants.items()}})


if __name__ == "__main__":
    main()
