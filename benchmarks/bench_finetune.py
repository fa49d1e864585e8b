"""Fine-tuning throughput, measured side by side in one run (images/s, higher is better):

(a) the shipped fine-tuning step: Lightning Trainer, batches drawn by index, weak and strong views
    made on the device, the algorithm's train_step, backward, clipping, optimizer step, EMA;
(b) the compute limit: the same model's train_step, backward and optimizer step on ready views.

The variants take turns (a, b, a, b, ...) and the medians are compared: machines are noisy.
An image is one labeled image or one unlabeled image (whose weak and strong views both count
as one). Prints a/b (goal >= 0.85).
Usage: python benchmarks/bench_finetune.py [--preset cpu|gpu] [--algorithm fixmatch]
                                           [--steps 15] [--repeats 3] [--json PATH]
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from turns import median, parser, runs_text, take_turns

from fewlabels.config import compose
from fewlabels.data import load_train_images
from fewlabels.files import write_json_atomic
from fewlabels.models import build_backbone
from fewlabels.runtime import resolve_precision
from fewlabels.semisup.run import build_learner


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.steps = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self.warmup:
            self.steps += 1

    def seconds_per_step(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return (time.perf_counter() - self.start) / self.steps


def learner(cfg, images, backbone_overrides: tuple[str, ...] = ()):
    """The preset's fine-tuning learner on 250 images with random labels (speed only); its
    backbone the preset's, with ``backbone_overrides`` (e.g. ``backbone.stem_stride=1``)."""
    backbone_cfg = compose("pretrain", [f"preset={cfg.preset}", *backbone_overrides]).backbone
    n = 250
    return build_learner(cfg, build_backbone(backbone_cfg), images[:n],
                         torch.randint(0, 10, (n,)).numpy(), images, seed=0)


def shipped(cfg, images, steps: int, warmup: int) -> float:
    module = learner(cfg, images)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(max_steps=steps + warmup, accelerator=cfg.trainer.accelerator,
                         devices=1, precision=cfg.trainer.precision, logger=False,
                         gradient_clip_val=cfg.optimizer.clip_grad_norm,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, torch.utils.data.DataLoader(range(steps + warmup), batch_size=None))
    return timer.seconds_per_step()


def ready_views(cfg, images, steps: int, warmup: int,
                backbone_overrides: tuple[str, ...] = ()) -> float:
    device = "cuda" if cfg.trainer.accelerator == "gpu" else "cpu"
    module = learner(cfg, images, backbone_overrides).to(device)
    optimizer = torch.optim.SGD(module.model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    idx_lb, y_lb, idx_ulb = module._draw(0)
    x_lb = module._format(module.weak(module.labeled_images[idx_lb].to(device)))
    x_weak = x_strong = None
    if idx_ulb is not None:
        unlabeled = module.pool_images[idx_ulb].to(device)
        x_weak, x_strong = (module._format(module.weak(unlabeled)),
                            module._format(module.strong(unlabeled)))
    y_lb = y_lb.to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16,
                              enabled=cfg.trainer.precision.startswith("bf16"))
    for i in range(steps + warmup):
        if i == warmup:
            start = time.perf_counter()
        with autocast:
            loss, _ = module.train_step(x_lb, y_lb, x_weak, x_strong)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    p = parser(__doc__, steps=15)
    p.add_argument("--algorithm", default="fixmatch")
    args = p.parse_args()
    cfg = compose("finetune", [f"preset={args.preset}", f"algorithm={args.algorithm}"])
    cfg.trainer.precision = resolve_precision(cfg.trainer)
    images = load_train_images().images
    per_step = learner(cfg, images[:300]).batches.images_per_step(args.algorithm != "supervised")
    runs = take_turns({
        "a": lambda: per_step / shipped(cfg, images, args.steps, args.warmup),
        "b": lambda: per_step / ready_views(cfg, images, args.steps, args.warmup),
    }, args.repeats)
    a, b = median(runs["a"]), median(runs["b"])
    print(f"\npreset={args.preset} algorithm={args.algorithm} images/step={per_step} "
          f"precision={cfg.trainer.precision} channels_last={cfg.trainer.channels_last} "
          f"steps={args.steps} (after {args.warmup} warm-up), median of {args.repeats} runs "
          "taking turns")
    print(f"(a) shipped step             : {a:8.0f} img/s  ({runs_text(runs['a'])})")
    print(f"(b) compute limit, ready views: {b:8.0f} img/s  ({runs_text(runs['b'])})")
    print(f"a/b = {a / b:.2f} (goal >= 0.85)")
    if args.json:
        write_json_atomic(args.json, {"preset": args.preset, "algorithm": args.algorithm,
                                      "config": OmegaConf.to_container(cfg, resolve=True),
                                      "a_img_s": runs["a"], "b_img_s": runs["b"],
                                      "a_median": a, "b_median": b, "a_over_b": a / b})


if __name__ == "__main__":
    main()
