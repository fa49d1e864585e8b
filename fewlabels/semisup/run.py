"""``fewlabels finetune``: select N ids from the pretrained features, query them, fine-tune
backbone + head with a registered algorithm, evaluate the final EMA model on the test set.

Per seed: one oracle run ``finetune/<tag><checkpoint>-<sha256[:8]>/<strategy>/n<N>/seed<S>``
(shared by the algorithms: they are given the same ids); one folder
``checkpoints/finetuned/<run>/`` (``last.ckpt`` to resume, ``model.safetensors``,
``config.yaml``, ``selection.json``, ``test_predictions.npy``); one
``results/finetune-<run>.json``; one W&B run (``job_type=finetune``, grouped by checkpoint).
Running the same command again resumes an unfinished run from ``last.ckpt`` and reveals no new
label; a finished run is read back, not trained again.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from fewlabels.config import to_yaml
from fewlabels.data import CLASSES, N_CLASSES, load_test_set, load_train_images
from fewlabels.data.transforms import StrongView, WeakView
from fewlabels.evaluate import evaluate, mean_std
from fewlabels.files import atomic_path, write_json_atomic, write_text_atomic
from fewlabels.models.checkpoint import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    FINETUNED_DIR,
    KIND_CLASSIFIER,
    LAST_FILE,
    WANDB_ID_FILE,
    Checkpoint,
    Classifier,
    backbone_config,
    load_backbone,
    newest_checkpoint,
    open_checkpoint,
    save_weights,
)
from fewlabels.names import safe_name
from fewlabels.oracle import Oracle, check_recorded
from fewlabels.probe.features import features
from fewlabels.probe.select import check_strategy, select
from fewlabels.runtime import (
    AtomicCheckpointIO,
    StepSeeds,
    TrainingClock,
    check_durations,
    git_commit,
    hardware,
    resolve_precision,
    time_limits,
    wall_time_s,
)
from fewlabels.semisup import ALGORITHMS, DISTILL, BatchSettings, Learner, OptimizerSettings
from fewlabels.tracking import wandb_mode

SELECTION_FILE, PREDICTIONS_FILE = "selection.json", "test_predictions.npy"


@dataclass(frozen=True)
class SeedRun:
    """Names of one seed's run: its oracle run id, folder and result file."""

    name: str
    oracle_run_id: str
    folder: Path
    result_file: Path


def seed_run(cfg: DictConfig, ckpt: Checkpoint, seed: int) -> SeedRun:
    base = f"{cfg.run_tag}{ckpt.name}-{ckpt.sha256[:8]}"
    name = f"{base}-{cfg.algorithm.name}-{cfg.strategy}-n{cfg.n}-seed{seed}"
    return SeedRun(name, f"finetune/{base}/{cfg.strategy}/n{cfg.n}/seed{seed}",
                   Path(cfg.checkpoint_dir) / FINETUNED_DIR / name,
                   Path(cfg.results_dir) / f"finetune-{name}.json")


def check_whole(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be a whole number >= {minimum}")


def validate(cfg: DictConfig, counts: tuple[str, ...] = ("n",)) -> None:
    """Every argument checked before any work is done or any row written; ``counts`` are the
    top-level keys that must be whole numbers >= 1 besides ``seeds``."""
    for key in (*counts, "seeds"):
        check_whole(cfg[key], key, 1)
    check_whole(cfg.first_seed, "first_seed", 0)
    check_strategy(cfg.strategy)
    safe_name(cfg.run_tag, "run_tag", allow_empty=True)
    if cfg.algorithm.name not in ALGORITHMS:
        raise ValueError(f"algorithm={cfg.algorithm.name!r}: use one of {', '.join(ALGORITHMS)}")
    if cfg.algorithm.name == DISTILL:
        raise ValueError(f"algorithm={DISTILL}: a fine-tuned model teaches itself there, so it "
                         "trains only the round that `make active ARGS=distill_fraction=<share "
                         "of trainer.steps>` adds after the last; give another algorithm")
    tr = cfg.trainer
    for key in ("steps", "steps_per_epoch", "eval_batch_size"):
        check_whole(tr[key], f"trainer.{key}", 1)
    check_durations(tr)
    if cfg.batch.labeled < 1 or cfg.batch.unlabeled_ratio < 0:
        raise ValueError("batch.labeled must be >= 1 and batch.unlabeled_ratio >= 0")


def build_learner(cfg: DictConfig, backbone: torch.nn.Module, labeled_images: np.ndarray,
                  labels: np.ndarray, pool: np.ndarray, seed: int) -> Learner:
    """The config stops here: everything below takes typed settings."""
    learner_class, read_settings = ALGORITHMS[cfg.algorithm.name]
    tr, o = cfg.trainer, cfg.optimizer
    optim = OptimizerSettings(lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                              weight_decay=o.weight_decay,
                              warmup_steps=round(o.warmup_fraction * tr.steps),
                              total_steps=tr.steps)
    batches = BatchSettings(cfg.batch.labeled, cfg.batch.unlabeled_ratio, seed, tr.channels_last)
    model = Classifier(backbone, N_CLASSES).train()
    learner = learner_class(model, torch.from_numpy(labeled_images), torch.from_numpy(labels),
                            torch.from_numpy(pool), batches, optim, cfg.ema_decay,
                            WeakView(cfg.weak.translate, cfg.weak.hflip_prob),
                            StrongView.from_config(cfg.strong),
                            **read_settings(cfg.algorithm))
    return learner.to(memory_format=torch.channels_last) if tr.channels_last else learner


def _selection(cfg: DictConfig, run: SeedRun, feats: np.ndarray, seed: int) -> np.ndarray:
    """The ids to query; saved before the first query so that a rerun asks for the same ones."""
    path = run.folder / SELECTION_FILE
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("n") == cfg.n and saved.get("strategy") == cfg.strategy:
                return np.array(saved["ids"], dtype=np.int64)
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: select again (the selection is deterministic for a seed)
    tc = cfg.typiclust
    ids = select(cfg.strategy, feats, cfg.n, seed, tc.neighbors, tc.minibatch_above,
                 tc.max_clusters)
    write_json_atomic(path, {"strategy": cfg.strategy, "n": cfg.n, "seed": seed,
                             "ids": [int(i) for i in ids]})
    return ids


# What decides the trained model; a run folder is only continued or read back under the same.
TRAINING_KEYS = ("n", "strategy", "pool_limit", "typiclust", "algorithm", "batch", "optimizer",
                 "ema_decay", "weak", "strong")
TRAINER_KEYS = ("steps", "steps_per_epoch", "precision", "channels_last",
                "batchnorm_calibration_images")


def _training_config(cfg: DictConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return {**{k: resolved.get(k) for k in keys},
            **{f"trainer.{k}": resolved["trainer"][k] for k in TRAINER_KEYS}}


def training_differences(cfg: DictConfig, saved: DictConfig,
                         keys: tuple[str, ...] = TRAINING_KEYS) -> list[str]:
    """The training settings (``keys`` and the trainer's) where ``saved`` differs from ``cfg``."""
    before, now = _training_config(saved, keys), _training_config(cfg, keys)
    return sorted(k for k in now if before.get(k) != now[k])


def check_same_training(cfg: DictConfig, folder: Path,
                        keys: tuple[str, ...] = TRAINING_KEYS) -> None:
    """A run folder is only continued or read back under the configuration that made it."""
    saved_file = folder / CONFIG_FILE
    if not saved_file.is_file():
        return
    try:
        saved = OmegaConf.load(saved_file)
        _training_config(saved, keys)
    except Exception as err:  # noqa: BLE001 — any unreadable config is the same user problem
        raise ValueError(f"{saved_file} cannot be read ({err}): move {folder} away to train "
                         "that seed again") from err
    differ = training_differences(cfg, saved, keys)
    if differ:
        before, now = _training_config(saved, keys), _training_config(cfg, keys)
        shown = ", ".join(f"{k}: {_short(before.get(k))} there, {_short(now[k])} now"
                          for k in differ)
        hint = ""
        if "trainer.precision" in differ:
            hint = ("; trainer.precision=auto follows the machine (bf16-mixed only where bf16 is "
                    "native): to continue that run here pass trainer.precision="
                    f"{before.get('trainer.precision')} (emulated bf16 is slow, "
                    "`make bench-precision`)")
        raise ValueError(f"{folder} was trained with another configuration (differs in {shown}): "
                         "pass run_tag=<new name> to train this one apart (it buys its own "
                         f"labels), or move that folder away{hint}")


def keep_first_config(cfg: DictConfig, folder: Path) -> None:
    """Write the run's ``config.yaml`` once: a later invocation (a resume, a read-back, one
    without ``branch_from``) trains alike (``check_same_training``) and must not replace the
    record of the one that made the folder."""
    if not (folder / CONFIG_FILE).is_file():
        write_text_atomic(folder / CONFIG_FILE, to_yaml(cfg))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def wandb_logger(cfg: DictConfig, folder: Path, name: str, group: str,
                 job_type: str) -> WandbLogger:
    """The W&B logger of a run folder; the same W&B run continues when the run resumes."""
    id_file = folder / WANDB_ID_FILE
    if not id_file.is_file():
        write_text_atomic(id_file, f"{job_type}-{uuid.uuid4().hex[:12]}")
    return WandbLogger(project=cfg.logger.project, name=name, id=id_file.read_text().strip(),
                       resume="allow", save_dir=cfg.logger.dir, mode=wandb_mode(cfg.logger.mode),
                       job_type=job_type, group=group,
                       config=OmegaConf.to_container(cfg, resolve=True))


@dataclass(frozen=True)
class Fitted:
    """What ``fit`` did: the steps the run has reached, and its wall time in seconds, in this
    invocation and over all invocations of the run (``TrainingClock``)."""

    steps: int
    wall_s_this_invocation: float
    wall_s: float


def fit(cfg: DictConfig, learner: Learner, folder: Path, logger: Any, name: str) -> Fitted:
    """Train for ``trainer.steps`` (resuming from ``folder/last.ckpt``), then set the EMA model's
    BatchNorm statistics on plain unlabeled images."""
    tr = cfg.trainer
    clock = TrainingClock()
    trainer = pl.Trainer(
        max_steps=tr.steps, max_epochs=-1, accelerator=tr.accelerator,
        devices=1, precision=tr.precision, gradient_clip_val=cfg.optimizer.clip_grad_norm,
        log_every_n_steps=tr.log_every_n_steps, logger=logger, default_root_dir=folder,
        plugins=[AtomicCheckpointIO()], enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=folder, filename="last", save_top_k=1,
                                   enable_version_counter=False),
                   LearningRateMonitor(logging_interval="step"), clock,
                   StepSeeds(learner.batches.seed), *time_limits(tr.max_time)])
    last = folder / LAST_FILE
    trainer.fit(learner, torch.utils.data.DataLoader(range(tr.steps_per_epoch), batch_size=None),
                ckpt_path=last if last.is_file() else None)
    fitted = Fitted(trainer.global_step, clock.this_invocation, clock.seconds)
    if trainer.global_step < tr.steps:
        print(f"WARNING: {name} stopped at step {trainer.global_step} of {tr.steps}: "
              f"trainer.max_time={tr.max_time} fired in this invocation. Its result is NOT "
              "the configured run; run the same command again to finish it (it resumes from "
              "last.ckpt).", flush=True)
    pool = learner.pool_images
    order = torch.from_numpy(np.random.default_rng(learner.batches.seed).permutation(len(pool)))
    learner.calibrate_batchnorm(pool[order[:tr.batchnorm_calibration_images]],
                                tr.eval_batch_size)
    return fitted


def train_seed(cfg: DictConfig, ckpt: Checkpoint, pool: np.ndarray, feats: np.ndarray,
               test_images: np.ndarray, test_labels: np.ndarray, seed: int) -> dict[str, Any]:
    run = seed_run(cfg, ckpt, seed)
    check_same_training(cfg, run.folder)
    if run.result_file.is_file() and (run.folder / CLASSIFIER_FILE).is_file():
        result = json.loads(run.result_file.read_text())
        if result.get("ended_by") == "steps":
            check_recorded(run.oracle_run_id, result["n_queries"], run.result_file)
            print(f"  seed {seed}: finished before ({run.result_file}), not trained again")
            return result
    run.folder.mkdir(parents=True, exist_ok=True)
    ids = _selection(cfg, run, feats, seed)
    with Oracle(run.oracle_run_id, budget=cfg.n, purpose="finetune") as oracle:
        labels = oracle.query(ids)
        n_queries = oracle.used
    keep_first_config(cfg, run.folder)

    pl.seed_everything(seed, workers=True)
    learner = build_learner(cfg, load_backbone(ckpt), pool[ids], labels, pool, seed)
    logger = wandb_logger(cfg, run.folder, run.name, ckpt.name, "finetune")
    commit = git_commit()
    fitted = fit(cfg, learner, run.folder, logger, run.name)
    steps_done, wall = fitted.steps, fitted.wall_s_this_invocation
    predictions = learner.predict_logits(torch.from_numpy(test_images),
                                         cfg.trainer.eval_batch_size).argmax(1).numpy()
    train_pred = learner.predict_logits(torch.from_numpy(pool[ids]),
                                        cfg.trainer.eval_batch_size).argmax(1).numpy()
    metrics = evaluate(predictions, test_labels)
    save_weights(learner.ema_model, run.folder / CLASSIFIER_FILE, KIND_CLASSIFIER,
                 backbone_config(ckpt.backbone_file), learner.model.backbone.num_features,
                 num_classes=str(N_CLASSES), algorithm=cfg.algorithm.name,
                 pretrained_sha256=ckpt.sha256)
    with atomic_path(run.folder / PREDICTIONS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, predictions.astype(np.int64))
    resumed_at = learner.start_step
    images_seen = sum(learner.batches.images_per_step(learner.needs_unlabeled(step))
                      for step in range(resumed_at, steps_done))
    result = {
        "checkpoint": str(ckpt.folder), "checkpoint_sha256": ckpt.sha256,
        "algorithm": cfg.algorithm.name, "strategy": cfg.strategy, "n": cfg.n,
        "n_queries": n_queries, "seed": seed, "oracle_run_id": run.oracle_run_id,
        "steps": steps_done, "steps_configured": cfg.trainer.steps,
        "ended_by": "steps" if steps_done >= cfg.trainer.steps else "time cap",
        "resumed_from_step": resumed_at, "wall_time_s": round(fitted.wall_s, 1),
        "wall_time_s_this_invocation": round(wall, 1),
        "images_per_sec": round(images_seen / wall, 1) if wall > 0 else None,  # with overheads
        "train_accuracy_on_queried": float((train_pred == labels).mean()),
        "hardware": hardware(), "precision": cfg.trainer.precision, "git_commit": commit,
        "torch": torch.__version__, **metrics,
    }
    write_json_atomic(run.result_file, result)
    _log_result(logger, result, pool[ids], labels)
    return result


def _log_result(logger: WandbLogger, result: dict[str, Any], images: np.ndarray,
                labels: np.ndarray) -> None:
    run = logger.experiment
    run.log(test_and_queried_media(result["confusion_matrix"], images, labels))
    run.summary.update({"test_accuracy": result["test_accuracy"], "n": result["n"],
                        "n_queries": result["n_queries"], "seed": result["seed"],
                        "steps": result["steps"],
                        "wall_time_s": result["wall_time_s"],
                        **{f"test/class_{i}_accuracy": a
                           for i, a in enumerate(result["per_class_accuracy"])}})
    run.finish()


def test_and_queried_media(confusion: list[list[int]], images: np.ndarray, labels: np.ndarray,
                           prefix: str = "") -> dict[str, Any]:
    """W&B items: the test confusion matrix as a W&B plot, and a grid of queried images with the
    labels the database returned (none when nothing was queried)."""
    import wandb

    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"],
                        data=[[CLASSES[i], CLASSES[j], confusion[i][j]] for i in range(N_CLASSES)
                              for j in range(N_CLASSES)])
    media = {f"{prefix}test/confusion_matrix": wandb.plot_table(
        "wandb/confusion_matrix/v1", table,
        {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        {"title": f"{prefix}test confusion matrix"})}
    if len(images):
        media[f"{prefix}queried/images"] = wandb.Image(
            _grid(images, labels), caption="queried images, labels from the database")
    return media


def _grid(images: np.ndarray, labels: np.ndarray, limit: int = 100) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(limit, len(images))
    cols = 10
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(cols * 1.1, 1.3 * (
        (n + cols - 1) // cols)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images[:n], labels[:n], strict=False):
        ax.imshow(image, cmap="gray")
        ax.set_title(CLASSES[int(label)], fontsize=6)
    fig.tight_layout()
    return fig


def finetune(cfg: DictConfig) -> list[dict[str, Any]]:
    validate(cfg)
    ckpt = open_checkpoint(cfg.checkpoint or newest_checkpoint(cfg.checkpoint_dir))
    pool = load_train_images().images[: cfg.pool_limit]
    if cfg.n > len(pool):
        raise ValueError(f"n={cfg.n}: the pool has {len(pool)} images")
    cfg.trainer.precision = resolve_precision(cfg.trainer)  # saved and logged as resolved
    test = load_test_set()
    train_feats, _ = features(ckpt, pool, test.images, cfg.feature_batch_size)
    results = [train_seed(cfg, ckpt, pool, train_feats, test.images, test.labels,
                          cfg.first_seed + s) for s in range(cfg.seeds)]
    accs = [r["test_accuracy"] for r in results]
    mean, std = mean_std(accs)
    print(f"checkpoint: {ckpt.folder}\nalgorithm={cfg.algorithm.name} strategy={cfg.strategy} "
          f"N={cfg.n}: test accuracy {mean:.2%} ± {std:.2%} ({len(accs)} seeds: "
          f"{', '.join(f'{a:.2%}' for a in accs)}); "
          f"{sum(r['n_queries'] for r in results)} queries counted by the label database; "
          f"{sum(wall_time_s(r) for r in results) / 60:.1f} min")
    return results
