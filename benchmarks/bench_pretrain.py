"""Pretraining throughput, measured side by side in one run (images/s, higher is better):

(a) the shipped pretraining step: Lightning Trainer, DataLoader, batched on-device augmentation,
    forward, backward, optimizer step;
(b) the compute limit: the same model's loss, backward and step on ready-made views;
(c) a lightly-example-style loop: per-image lightly transforms in DataLoader workers, same model.

The paths take turns (a, b, c, a, b, c, ...) and the medians are compared. Prints a/b (goal >=
0.9) and a/c (goal >= 3).
Usage: python benchmarks/bench_pretrain.py [--preset cpu|gpu] [--steps 20] [--method simclr]
                                          [--repeats 3] [--json results/bench.json]
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from turns import median, parser, runs_text, take_turns

from fewlabels.config import compose
from fewlabels.data import load_train_images
from fewlabels.files import write_json_atomic
from fewlabels.runtime import resolve_precision
from fewlabels.ssl import method_class
from fewlabels.ssl.train import make_loader


class StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.images = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.images += batch.shape[0] if isinstance(batch, torch.Tensor) else len(batch[0])

    def rate(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return self.images / (time.perf_counter() - self.start)


def trainer_rate(cfg, images, steps: int, warmup: int) -> float:
    module = method_class(cfg.method.name)(cfg)
    if cfg.trainer.channels_last:
        module = module.to(memory_format=torch.channels_last)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(max_steps=steps + warmup, accelerator=cfg.trainer.accelerator,
                         devices=1, precision=cfg.trainer.precision, logger=False,
                         benchmark=cfg.trainer.cudnn_benchmark,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, make_loader(cfg, images))
    return timer.rate()


def compute_limit_rate(cfg, images, steps: int, warmup: int) -> float:
    device = "cuda" if cfg.trainer.accelerator == "gpu" else "cpu"
    torch.backends.cudnn.benchmark = cfg.trainer.cudnn_benchmark
    module = method_class(cfg.method.name)(cfg).to(device)
    if cfg.trainer.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    batch = torch.from_numpy(images[: cfg.data.batch_size]).to(device)
    views = [v.contiguous(memory_format=torch.channels_last) if cfg.trainer.channels_last else v
             for v in module.two_views(batch)]
    autocast = torch.autocast(device, dtype=torch.bfloat16,
                              enabled=cfg.trainer.precision.startswith("bf16"))
    for i in range(steps + warmup):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast:
            loss = module.loss(*views)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * cfg.data.batch_size / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__, steps=20)
    p.add_argument("--method", default="simclr")
    args = p.parse_args()
    images = load_train_images().images
    base = [f"preset={args.preset}", f"method={args.method}"]
    shipped = compose("pretrain", base)
    per_image = compose("pretrain", [*base, "data.augment=per_image"])
    for cfg in (shipped, per_image):
        cfg.trainer.precision = resolve_precision(cfg.trainer)

    runs = take_turns({
        "a": lambda: trainer_rate(shipped, images, args.steps, args.warmup),
        "b": lambda: compute_limit_rate(shipped, images, args.steps, args.warmup),
        "c": lambda: trainer_rate(per_image, images, args.steps, args.warmup),
    }, args.repeats)
    a, b, c = (median(runs[k]) for k in "abc")
    print(f"\npreset={args.preset} method={args.method} batch={shipped.data.batch_size} "
          f"backbone={shipped.backbone.name} precision={shipped.trainer.precision} "
          f"channels_last={shipped.trainer.channels_last} steps={args.steps} "
          f"(after {args.warmup} warm-up), median of {args.repeats} runs taking turns")
    print(f"(a) shipped step, batched augmentation : {a:9.0f} img/s  ({runs_text(runs['a'])})")
    print(f"(b) compute limit, ready views         : {b:9.0f} img/s  ({runs_text(runs['b'])})")
    print(f"(c) per-image lightly transforms, {per_image.data.num_workers} workers: {c:9.0f} img/s"
          f"  ({runs_text(runs['c'])})")
    print(f"a/b = {a / b:.2f} (goal >= 0.9)    a/c = {a / c:.2f} (goal >= 3)")
    if args.json:
        write_json_atomic(args.json, {
            "preset": args.preset, "method": args.method, "backbone": shipped.backbone.name,
            "batch_size": shipped.data.batch_size, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "precision": shipped.trainer.precision,
            "channels_last": shipped.trainer.channels_last,
            "per_image_workers": per_image.data.num_workers,
            "hardware": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else f"cpu, {torch.get_num_threads()} threads",
            "runs_img_s": runs, "a_shipped_img_s": a, "b_compute_limit_img_s": b,
            "c_per_image_img_s": c, "a_over_b": a / b, "a_over_c": a / c})


if __name__ == "__main__":
    main()
