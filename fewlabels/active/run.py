"""``fewlabels active``: the label-efficiency curve from rounds of buying labels.

Per seed, one oracle run ``active/<tag><checkpoint>-<sha8>/<algorithm>/<cold>-<select>/b<budgets>/
seed<S>`` whose budget is the last entry of ``budgets``. Round 0 picks the first budget's ids with
the cold-start strategy on the pretrained features; round k scores the unlabeled pool with round
k-1's model, buys the increment up to ``budgets[k]`` with the acquisition ``select`` (rows
recorded with ``purpose=round<k>``), and fine-tunes again (from round k-1's model when
``warm_start``). Every round's final model is evaluated on the test set; the evaluation chooses
nothing.

Folders: ``checkpoints/finetuned/active-<run>-seed<S>/round<k>/`` with ``selection.json`` (saved
before the query, so a rerun asks for the same ids), ``last.ckpt``, ``model.safetensors``,
``test_predictions.npy`` and ``round.json`` (written last: a round with it is done). A killed run
resumes in the round it was in; a finished one is read back. ``last_round_fraction`` trains the
last round longer (the run is then named ``…-b<budgets>-last<steps>``), and ``branch_from=<run>``
copies the leading rounds of another run that this one would train alike (same checkpoint,
settings, budgets so far and steps): their ids are queried again under this run's id, so the
database counts them here too, and their models and test predictions are copied, not retrained;
from a run that differs only in ``select`` just round 0 (the cold start) is copied.
``last_round_unlabeled_ratio=<mu>`` draws mu unlabeled images per labeled one in the last round
(``batch.unlabeled_ratio`` in the others; the run is named ``…-mu<mu>``).
``last_round_stream=<i>`` trains the last round from another random stream (the batches and
augmentations it draws; the same ids, settings and starting model), to measure what chance alone
moves (the run is named ``…-stream<i>``).
``replay_from=<run>`` buys in every round the ids that run's same seed bought in that round
(:mod:`fewlabels.active.replay`), so another checkpoint learns from the same labels (the run is
named ``active-<checkpoint>-<sha8>-<algorithm>-replay-<sha8 of the run's name>-b<budgets>…``).
``last_round_algorithm=<name>`` trains the last round alone with another algorithm (the run is
named ``…-<name>``); a branch never copies a round trained with another algorithm, ratio or
stream.
``distill_fraction=<f>`` adds one round after the last that buys nothing: the last round's model
teaches a student that starts from it (``configs/finetune/algorithm/distill.yaml``, SimCLRv2's
self-distillation with a noisy student) for ``f`` of ``trainer.steps`` (the run is named
``…-distill<steps>``); its row in the curve has the last budget's queries.
Outputs: ``results/active-<run>.csv`` / ``.png`` / ``.json`` (one row per round: the queries the
database counted, test accuracy mean ± std over seeds) and W&B (a run per round with its confusion
matrix and the images just bought; a curve run with the table and a line plot).
"""

from __future__ import annotations

import copy
import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from fewlabels.active import ACQUISITIONS
from fewlabels.active.replay import REPLAY, ReplayedRound, replay_rounds, replay_tag
from fewlabels.active.rounds import ROUND_FILE, SELECTION_FILE, round_folder, seeds_name
from fewlabels.config import compose
from fewlabels.data import load_test_set, load_train_images
from fewlabels.data.transforms import normalize_uint8
from fewlabels.evaluate import evaluate, mean_std
from fewlabels.files import atomic_path, write_json_atomic
from fewlabels.models.checkpoint import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    FINETUNED_DIR,
    KIND_CLASSIFIER,
    Checkpoint,
    Classifier,
    backbone_config,
    load_backbone,
    load_classifier,
    newest_checkpoint,
    open_checkpoint,
    save_weights,
    weights_metadata,
)
from fewlabels.names import safe_name
from fewlabels.oracle import Oracle, check_recorded
from fewlabels.probe.features import features
from fewlabels.probe.select import select
from fewlabels.runtime import git_commit, hardware, resolve_precision, wall_time_s
from fewlabels.semisup import ALGORITHMS, DISTILL
from fewlabels.semisup.run import (
    PREDICTIONS_FILE,
    TRAINING_KEYS,
    build_learner,
    check_same_training,
    check_whole,
    fit,
    keep_first_config,
    test_and_queried_media,
    training_differences,
    validate,
    wandb_logger,
)
from fewlabels.tracking import init_run

# Seeds are seed * 1000 + round; each other stream adds this span, so that no two meet while
# seeds stay below 1,000 and streams at most MAX_STREAM (under seed_everything's 2**32).
MAX_STREAM_SEED_SPAN, MAX_STREAM = 1_000_000, 1000
# Settings every round of a branch's source must share; `select` is compared round by round
# (round.json's "how"), since round 0 picks with the cold start.
ROUND_KEYS = (*TRAINING_KEYS, "warm_start", "round_fraction", "replay_from")
ACTIVE_KEYS = (*ROUND_KEYS, "select", "budgets", "last_round_fraction",
               "last_round_unlabeled_ratio", "last_round_stream", "last_round_algorithm",
               "distill_fraction", "distill_algorithm")


@dataclass(frozen=True)
class ActiveRun:
    """Names of one seed's active run."""

    name: str            # all seeds: the results file stem and the W&B group
    seed_name: str
    oracle_run_id: str
    folder: Path


def round_budgets(cfg: DictConfig) -> list[int]:
    """The labels each round ends with: ``budgets``, and the last again for the distillation
    round when ``distill_fraction`` is set."""
    return [*cfg.budgets, *([cfg.budgets[-1]] if cfg.distill_fraction is not None else [])]


def is_distill_round(cfg: DictConfig, k: int) -> bool:
    return k == len(cfg.budgets)


def round_how(cfg: DictConfig, k: int) -> str:
    """How round k's new ids were chosen (the distillation round chooses none)."""
    if is_distill_round(cfg, k):
        return DISTILL
    return REPLAY if cfg.replay_from is not None else cfg.strategy if k == 0 else cfg.select


def last_round_setting(cfg: DictConfig, k: int, key: str, otherwise: Any) -> Any:
    """``cfg[key]`` (a ``last_round_*`` override) for the last budget's round when it is set,
    ``otherwise`` for every other round."""
    value = cfg[key]
    return value if k == len(cfg.budgets) - 1 and value is not None else otherwise


def round_steps(cfg: DictConfig, k: int) -> int:
    """Round k's configured steps: all of trainer.steps from the pretrained backbone, a share of
    them (``round_fraction``, the last round ``last_round_fraction`` when set, the distillation
    round ``distill_fraction``) warm-started."""
    if not (cfg.warm_start and k > 0):
        return int(cfg.trainer.steps)
    if is_distill_round(cfg, k):
        return max(1, round(float(cfg.distill_fraction) * cfg.trainer.steps))
    fraction = float(last_round_setting(cfg, k, "last_round_fraction", cfg.round_fraction))
    return max(1, round(fraction * cfg.trainer.steps))


def round_unlabeled_ratio(cfg: DictConfig, k: int) -> int:
    """Round k's unlabeled images per labeled one: ``last_round_unlabeled_ratio`` for the last
    round when set, ``batch.unlabeled_ratio`` otherwise."""
    return int(last_round_setting(cfg, k, "last_round_unlabeled_ratio", cfg.batch.unlabeled_ratio))


def round_stream(cfg: DictConfig, k: int) -> int:
    """Round k's random stream: ``last_round_stream`` for the last round when set, 0 (the seed's
    own) otherwise."""
    return int(last_round_setting(cfg, k, "last_round_stream", 0))


def round_seed(cfg: DictConfig, seed: int, k: int) -> int:
    """The number round k of a seed seeds its randomness with: ``seed * 1000 + k`` in the seed's
    own stream, and another million for each stream after it (``last_round_stream``)."""
    return seed * 1000 + k + MAX_STREAM_SEED_SPAN * round_stream(cfg, k)


def round_algorithm(cfg: DictConfig, k: int) -> DictConfig:
    """Round k's algorithm settings: ``last_round_algorithm`` (resolved by ``active``) for the
    last round when set, ``distill_algorithm`` (likewise) for the distillation round,
    ``algorithm`` otherwise."""
    if is_distill_round(cfg, k):
        return cfg.distill_algorithm
    return last_round_setting(cfg, k, "last_round_algorithm", cfg.algorithm)


def active_run(cfg: DictConfig, ckpt: Checkpoint, seed: int) -> ActiveRun:
    base = f"{cfg.run_tag}{ckpt.name}-{ckpt.sha256[:8]}"
    budgets = "-".join(str(b) for b in cfg.budgets)
    if cfg.last_round_fraction is not None:
        budgets += f"-last{round_steps(cfg, len(cfg.budgets) - 1)}"
    if cfg.last_round_unlabeled_ratio is not None:
        budgets += f"-mu{round_unlabeled_ratio(cfg, len(cfg.budgets) - 1)}"
    if cfg.last_round_stream is not None:
        budgets += f"-stream{round_stream(cfg, len(cfg.budgets) - 1)}"
    if cfg.last_round_algorithm is not None:
        budgets += f"-{round_algorithm(cfg, len(cfg.budgets) - 1).name}"
    if cfg.distill_fraction is not None:
        budgets += f"-{DISTILL}{round_steps(cfg, len(cfg.budgets))}"
    how = (replay_tag(cfg.replay_from) if cfg.replay_from is not None
           else f"{cfg.strategy}-{cfg.select}")
    name = f"active-{base}-{cfg.algorithm.name}-{how}-b{budgets}"
    return ActiveRun(name, f"{name}-seed{seed}",
                     f"active/{base}/{cfg.algorithm.name}/{how}/b{budgets}/seed{seed}",
                     Path(cfg.checkpoint_dir) / FINETUNED_DIR / f"{name}-seed{seed}")


def validate_active(cfg: DictConfig) -> list[int]:
    """Every argument checked before any work is done or any row written; the budgets."""
    validate(cfg, counts=())
    for key, most in (("round_fraction", 1.0), ("last_round_fraction", float("inf")),
                      ("distill_fraction", float("inf"))):
        value = cfg[key]
        if key != "round_fraction" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= most:
            raise ValueError(f"{key}={value!r}: the share of trainer.steps a warm-started round "
                             "trains, a number " + ("in (0, 1]" if most == 1 else
                                                    "above 0 (2.0: twice the steps)"))
    budgets = list(cfg.budgets)
    if cfg.last_round_fraction is not None and not (cfg.warm_start and len(budgets) > 1):
        raise ValueError("last_round_fraction applies to a warm-started last round: give two or "
                         "more budgets and warm_start=true, or leave it unset")
    if cfg.distill_fraction is not None and not cfg.warm_start:
        raise ValueError("distill_fraction: the distillation round starts from the last round's "
                         "model (its teacher); it needs warm_start=true")
    name = cfg.last_round_algorithm
    if name is not None and (not isinstance(name, str) or name not in ALGORITHMS
                             or name == DISTILL or len(budgets) < 2):
        raise ValueError(f"last_round_algorithm={name!r}: the name of an algorithm that trains "
                         f"the last of two or more rounds, one of {', '.join(ALGORITHMS)} "
                         "(configs/finetune/algorithm/), or leave it unset")
    ratio = cfg.last_round_unlabeled_ratio
    if ratio is not None:
        check_whole(ratio, "last_round_unlabeled_ratio", 1)
        if len(budgets) < 2:
            raise ValueError(f"last_round_unlabeled_ratio={ratio!r}: the unlabeled images per "
                             "labeled one in the last of two or more rounds; give two or more "
                             "budgets, or set batch.unlabeled_ratio")
    stream = cfg.last_round_stream
    if stream is not None:
        check_whole(stream, "last_round_stream", 1)
        if stream > MAX_STREAM or len(budgets) < 2:
            raise ValueError(f"last_round_stream={stream!r}: another random stream for the last "
                             f"of two or more rounds, a whole number from 1 to {MAX_STREAM}; "
                             "give two or more budgets, or leave it unset")
    for key in ("branch_from", "replay_from"):
        if cfg[key] is not None:
            safe_name(cfg[key], key)
    for b in budgets:
        check_whole(b, "budgets entry", 1)
    if not budgets or any(b >= c for b, c in zip(budgets, budgets[1:], strict=False)):
        raise ValueError(f"budgets={budgets}: give a non-empty, strictly increasing list of "
                         "label counts, e.g. budgets=[20,40,100]")
    if cfg.select not in ACQUISITIONS:
        raise ValueError(f"select={cfg.select!r}: use one of {', '.join(ACQUISITIONS)}")
    if not 0 < float(cfg.target) <= 1:
        raise ValueError(f"target={cfg.target!r}: a test accuracy in (0, 1], e.g. 0.9")
    return budgets


def branch_rounds(cfg: DictConfig, ckpt: Checkpoint, seed: int) -> list[Path]:
    """The leading round folders of ``branch_from``'s seed that this run would train alike (none
    without ``branch_from``, or when that run has other seeds of this command but not this one);
    a clear error when that run does not exist or trained otherwise."""
    if cfg.branch_from is None:
        return []
    def seed_folder(s: int) -> Path:
        return Path(cfg.checkpoint_dir) / FINETUNED_DIR / f"{cfg.branch_from}-seed{s}"

    source = seed_folder(seed)
    hint = ("give the name of an active run of this checkpoint that 'make active' printed "
            "(results/<name>.csv) and that ran this seed")
    if not (source / CONFIG_FILE).is_file() and any(
            (seed_folder(s) / CONFIG_FILE).is_file()
            for s in range(cfg.first_seed, cfg.first_seed + cfg.seeds)):
        print(f"  seed {seed}: branch_from={cfg.branch_from} did not run this seed; every round "
              "trains", flush=True)
        return []
    if not (source / CONFIG_FILE).is_file() or not (round_folder(source, 0) / ROUND_FILE).is_file():
        raise ValueError(f"branch_from={cfg.branch_from!r}: {source} holds no finished round of "
                         f"seed {seed}; {hint}")
    try:
        saved = OmegaConf.load(source / CONFIG_FILE)
        differ = training_differences(cfg, saved, ROUND_KEYS)
        saved_budgets = list(saved.budgets)
    except Exception as err:  # noqa: BLE001 — any unreadable config is the same user problem
        raise ValueError(f"branch_from={cfg.branch_from!r}: {source / CONFIG_FILE} cannot be "
                         f"read ({err}); {hint}") from err
    if differ:
        raise ValueError(f"branch_from={cfg.branch_from!r}: {source} was trained otherwise "
                         f"(differs in {', '.join(differ)}), so none of its rounds is this run's")
    rounds = []
    for k in range(len(cfg.budgets)):
        folder = round_folder(source, k)
        if (saved_budgets[:k + 1] != list(cfg.budgets[:k + 1])
                or not (folder / ROUND_FILE).is_file()):
            break
        done = json.loads((folder / ROUND_FILE).read_text())
        if (done["steps_configured"] != round_steps(cfg, k)
                or done["how"] != round_how(cfg, k)
                or done.get("algorithm", cfg.algorithm.name) != round_algorithm(cfg, k).name
                or done.get("unlabeled_ratio", saved.batch.unlabeled_ratio)
                != round_unlabeled_ratio(cfg, k)
                or done.get("stream", 0) != round_stream(cfg, k)):
            break
        rounds.append(folder)
    # The next round starts from the last copied round's model; the earlier ones need only their
    # records (a folder `make keep` carried holds the models of its last two finished rounds).
    while rounds and not (rounds[-1] / CLASSIFIER_FILE).is_file():
        rounds.pop()
    if not rounds:
        raise ValueError(f"branch_from={cfg.branch_from!r}: {source} has no round this run would "
                         f"train alike whose {CLASSIFIER_FILE} is there to continue from; drop "
                         "branch_from to train every round")
    if weights_metadata(rounds[-1] / CLASSIFIER_FILE).get("pretrained_sha256") != ckpt.sha256:
        raise ValueError(f"branch_from={cfg.branch_from!r}: {rounds[-1]} was fine-tuned from "
                         f"another checkpoint than {ckpt.folder}, so none of its rounds is "
                         "this run's")
    return rounds


def _copy_round(cfg: DictConfig, run: ActiveRun, k: int, source: Path, labeled: np.ndarray,
                ) -> dict[str, Any]:
    """Round k taken from another run's identical round: its ids bought under this run's id (the
    database counts them here), its model and test predictions copied, nothing trained."""
    folder = round_folder(run.folder, k)
    folder.mkdir(parents=True, exist_ok=True)
    result = json.loads((source / ROUND_FILE).read_text())
    new = np.array(json.loads((source / SELECTION_FILE).read_text())["new_ids"], dtype=np.int64)
    ids = np.concatenate([labeled, new]).astype(np.int64)
    if ids.tolist() != result["ids"]:
        raise ValueError(f"{source} does not continue this run's earlier rounds; move "
                         f"{run.folder} away and run again")
    write_json_atomic(folder / SELECTION_FILE, {"round": k, "budget": round_budgets(cfg)[k],
                                                "how": result["how"],
                                                "new_ids": new.tolist(),
                                                "copied_from": str(source)})
    with Oracle(run.oracle_run_id, budget=cfg.budgets[-1], purpose="active") as oracle:
        oracle.query(ids, purpose=f"round{k}")
        n_queries = oracle.used
    for name in (CLASSIFIER_FILE, PREDICTIONS_FILE):  # a carried source may lack them
        if (source / name).is_file():
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(source / name, tmp)
    result.update(n_queries=n_queries, oracle_run_id=run.oracle_run_id,
                  copied_from=str(source), wall_time_s=0.0, wall_time_s_this_invocation=0.0,
                  wall_time_s_source=wall_time_s(result))
    write_json_atomic(folder / ROUND_FILE, result)
    return result


@torch.no_grad()
def score_pool(model: Classifier, pool: np.ndarray, batch_size: int,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and penultimate features of every pool image (eval mode)."""
    model.eval()
    probs, feats = [], []
    for chunk in torch.from_numpy(pool).split(batch_size):
        h = model.backbone(normalize_uint8(chunk)).float()
        probs.append(torch.softmax(model.head(h), dim=1))
        feats.append(h)
    return torch.cat(probs).numpy(), torch.cat(feats).numpy()


def _new_ids(cfg: DictConfig, run: ActiveRun, k: int, budget: int, labeled: np.ndarray,
             pool: np.ndarray, pretrained_feats: np.ndarray | None, seed: int,
             replayed: list[ReplayedRound]) -> np.ndarray:
    """Round k's new ids, saved before they are queried so that a rerun asks for the same."""
    path = round_folder(run.folder, k) / SELECTION_FILE
    if path.is_file():
        return np.array(json.loads(path.read_text())["new_ids"], dtype=np.int64)
    replayed_from: dict[str, str] = {}
    if is_distill_round(cfg, k):
        new = np.zeros(0, dtype=np.int64)
    elif replayed:
        new = replayed[k].new_ids
        replayed_from = {"replayed_from": str(replayed[k].folder)}
    elif k == 0:
        tc = cfg.typiclust
        new = select(cfg.strategy, pretrained_feats, budget, seed, tc.neighbors,
                     tc.minibatch_above, tc.max_clusters)
    else:
        previous = load_classifier(round_folder(run.folder, k - 1) / CLASSIFIER_FILE)
        probs, feats = score_pool(previous, pool, cfg.trainer.eval_batch_size)
        new = ACQUISITIONS[cfg.select](probs, feats, labeled, budget - len(labeled),
                                       seed * 1000 + k)
    write_json_atomic(path, {"round": k, "budget": budget,
                             "how": round_how(cfg, k),
                             "new_ids": [int(i) for i in new], **replayed_from})
    return new


def _round(cfg: DictConfig, ckpt: Checkpoint, run: ActiveRun, k: int, budget: int,
           labeled: np.ndarray, pool: np.ndarray, pretrained_feats: np.ndarray | None,
           test_images: np.ndarray, test_labels: np.ndarray, seed: int,
           replayed: list[ReplayedRound]) -> dict[str, Any]:
    folder = round_folder(run.folder, k)
    done = folder / ROUND_FILE
    folder.mkdir(parents=True, exist_ok=True)
    new = _new_ids(cfg, run, k, budget, labeled, pool, pretrained_feats, seed, replayed)
    ids = np.concatenate([labeled, new]).astype(np.int64)
    with Oracle(run.oracle_run_id, budget=cfg.budgets[-1], purpose="active") as oracle:
        labels = oracle.query(ids, purpose=f"round{k}")  # earlier rounds' ids cost nothing
        n_queries = oracle.used

    warm = bool(cfg.warm_start) and k > 0
    round_cfg = copy.deepcopy(cfg)
    round_cfg.trainer.steps = round_steps(cfg, k)
    round_cfg.algorithm = round_algorithm(cfg, k)
    round_cfg.batch.unlabeled_ratio = round_unlabeled_ratio(cfg, k)
    stream_seed = round_seed(cfg, seed, k)
    pl.seed_everything(stream_seed, workers=True)
    learner = build_learner(round_cfg, load_backbone(ckpt), pool[ids], labels, pool, stream_seed)
    if warm:
        state = load_classifier(round_folder(run.folder, k - 1) / CLASSIFIER_FILE).state_dict()
        learner.model.load_state_dict(state)
        learner.ema_model.load_state_dict(state)
    logger = wandb_logger(round_cfg, folder, f"{run.seed_name}-round{k}", run.name, "active")
    fitted = fit(round_cfg, learner, folder, logger, f"{run.seed_name} round {k}")
    predictions = learner.predict_logits(torch.from_numpy(test_images),
                                         cfg.trainer.eval_batch_size).argmax(1).numpy()
    metrics = evaluate(predictions, test_labels)
    with atomic_path(folder / PREDICTIONS_FILE) as tmp, open(tmp, "wb") as f:
        np.save(f, predictions.astype(np.int64))
    save_weights(learner.ema_model, folder / CLASSIFIER_FILE, KIND_CLASSIFIER,
                 backbone_config(ckpt.backbone_file), learner.model.backbone.num_features,
                 num_classes=str(learner.model.head.out_features),
                 algorithm=round_cfg.algorithm.name, pretrained_sha256=ckpt.sha256)
    result = {"round": k, "budget": budget, "n_queries": n_queries, "seed": seed,
              "new_ids": len(new), "how": round_how(cfg, k),
              "algorithm": round_cfg.algorithm.name,
              "unlabeled_ratio": round_cfg.batch.unlabeled_ratio,
              "stream": round_stream(cfg, k),
              "warm_start": warm, "steps": fitted.steps,
              "steps_configured": round_cfg.trainer.steps,
              "ended_by": "steps" if fitted.steps >= round_cfg.trainer.steps else "time cap",
              "wall_time_s": round(fitted.wall_s, 1),
              "wall_time_s_this_invocation": round(fitted.wall_s_this_invocation, 1),
              "ids": [int(i) for i in ids],
              "oracle_run_id": run.oracle_run_id, **metrics}
    run_log = logger.experiment
    run_log.log({"round/n_queries": n_queries, "round/test_accuracy": metrics["test_accuracy"],
                 **test_and_queried_media(metrics["confusion_matrix"], pool[new],
                                          labels[len(labeled):], prefix="round/")})
    run_log.summary.update({"test_accuracy": metrics["test_accuracy"], "round": k,
                            "n_queries": n_queries, "seed": seed})
    run_log.finish()
    if result["ended_by"] == "steps":  # a time-capped round is continued by the next run
        write_json_atomic(done, result)
    return result


def run_seed(cfg: DictConfig, ckpt: Checkpoint, pool: np.ndarray,
             pretrained_feats: np.ndarray | None, test_images: np.ndarray,
             test_labels: np.ndarray, seed: int, sources: list[Path],
             replayed: list[ReplayedRound]) -> list[dict[str, Any]] | None:
    """The seed's rounds (the first ``len(sources)`` copied from those round folders unless this
    run has them already; with ``replayed``, each round buying that source round's new ids);
    None when trainer.max_time stopped one (run the command again)."""
    run = active_run(cfg, ckpt, seed)
    check_same_training(cfg, run.folder, ACTIVE_KEYS)
    run.folder.mkdir(parents=True, exist_ok=True)
    keep_first_config(cfg, run.folder)
    labeled = np.zeros(0, dtype=np.int64)
    rounds = []
    for k, budget in enumerate(round_budgets(cfg)):
        done = round_folder(run.folder, k) / ROUND_FILE
        if done.is_file():  # finished before: read back, whether trained or copied
            result = json.loads(done.read_text())
            check_recorded(run.oracle_run_id, result["n_queries"], done)
        elif k < len(sources):
            result = _copy_round(cfg, run, k, sources[k], labeled)
        else:
            result = _round(cfg, ckpt, run, k, budget, labeled, pool, pretrained_feats,
                            test_images, test_labels, seed, replayed)
        algorithm = result.get("algorithm", cfg.algorithm.name)
        other = f"{algorithm}, " if algorithm not in (cfg.algorithm.name, result["how"]) else ""
        copied = f", copied from {result['copied_from']}" if "copied_from" in result else ""
        print(f"  seed {seed} round {k}: {result['n_queries']} labels counted, test accuracy "
              f"{result['test_accuracy']:.2%} ({result['how']}, {other}{result['steps']} steps, "
              f"{wall_time_s(result) / 60:.1f} min{copied})", flush=True)
        if result["ended_by"] != "steps":
            return None
        labeled = np.array(result["ids"], dtype=np.int64)
        rounds.append(result)
    return rounds


def curve_rows(per_seed: list[list[dict[str, Any]]], budgets: list[int]) -> list[dict[str, Any]]:
    """One row per round: what the database counted and the test accuracy over seeds."""
    rows = []
    for k, budget in enumerate(budgets):
        accs = [rounds[k]["test_accuracy"] for rounds in per_seed]
        queries = [rounds[k]["n_queries"] for rounds in per_seed]
        mean, std = mean_std(accs)
        rows.append({"round": k, "budget": budget, "queries_per_seed": max(queries),
                     "queries_total": sum(queries), "seeds": len(accs), "mean": mean, "std": std,
                     "accuracies": " ".join(f"{a:.4f}" for a in accs),
                     "wall_time_s": round(sum(wall_time_s(r[k]) for r in per_seed), 1)})
    return rows


CURVE_FIELDS = ["round", "budget", "queries_per_seed", "queries_total", "seeds", "mean", "std",
                "accuracies", "wall_time_s"]


def _write_curve(rows: list[dict[str, Any]], out: Path, title: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar([r["queries_per_seed"] for r in rows], [r["mean"] for r in rows],
                yerr=[r["std"] for r in rows], marker="o", capsize=3, label="active rounds")
    ax.axhline(target, color="gray", linestyle="--", label=f"target {target:.0%}")
    ax.set(xscale="log", xlabel="labels counted by the database (per seed)",
           ylabel="test accuracy", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    with atomic_path(out.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _log_curve(cfg: DictConfig, name: str, group: str, rows: list[dict[str, Any]],
               png: Path) -> None:
    import wandb

    run = init_run(cfg, name=f"{name}-curve", group=group, job_type="active-curve")
    table = wandb.Table(columns=CURVE_FIELDS, data=[[r[k] for k in CURVE_FIELDS] for r in rows])
    run.log({"curve/table": table,
             "curve/accuracy": wandb.plot.line(table, "queries_per_seed", "mean",
                                               title="test accuracy against labels counted"),
             "curve/plot": wandb.Image(str(png))})
    run.finish()


def active(cfg: DictConfig) -> dict[str, Any]:
    budgets = validate_active(cfg)
    ckpt = open_checkpoint(cfg.checkpoint or newest_checkpoint(cfg.checkpoint_dir))
    cfg.trainer.precision = resolve_precision(cfg.trainer)
    if cfg.last_round_algorithm is not None:  # the name becomes its settings, saved and compared
        cfg.last_round_algorithm = compose("finetune",
                                           [f"algorithm={cfg.last_round_algorithm}"]).algorithm
    if cfg.distill_fraction is not None:  # likewise; absent otherwise, as in older run folders
        with open_dict(cfg):
            cfg.distill_algorithm = compose("finetune", [f"algorithm={DISTILL}"]).algorithm
    seeds = [cfg.first_seed + s for s in range(cfg.seeds)]
    sources = {seed: branch_rounds(cfg, ckpt, seed) for seed in seeds}
    pool = load_train_images().images[: cfg.pool_limit]
    if budgets[-1] > len(pool):
        raise ValueError(f"budgets={budgets}: the pool has {len(pool)} images")
    replayed = {seed: [] if cfg.replay_from is None else
                replay_rounds(cfg.replay_from, cfg.checkpoint_dir, budgets, seed, len(pool))
                for seed in seeds}
    test = load_test_set()
    pretrained_feats = None  # a replayed round 0 needs no cold start
    if cfg.replay_from is None:
        pretrained_feats, _ = features(ckpt, pool, test.images, cfg.feature_batch_size)
    finished = [run_seed(cfg, ckpt, pool, pretrained_feats, test.images, test.labels, seed,
                         sources[seed], replayed[seed]) for seed in seeds]
    per_seed = [rounds for rounds in finished if rounds is not None]
    if len(per_seed) < len(finished):
        print("WARNING: trainer.max_time stopped a round before its steps; no curve is written. "
              "Run the same command again to continue from there.", flush=True)
        return {}
    rows = curve_rows(per_seed, round_budgets(cfg))
    name = seeds_name(active_run(cfg, ckpt, seeds[0]).name, seeds)
    out = Path(cfg.results_dir) / name
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_curve(rows, out, name, float(cfg.target))
    passing = next((r for r in rows if r["mean"] > cfg.target), None)
    summary = {"checkpoint": str(ckpt.folder), "checkpoint_sha256": ckpt.sha256,
               "algorithm": cfg.algorithm.name,
               "last_round_algorithm": round_algorithm(cfg, len(budgets) - 1).name,
               "last_round_unlabeled_ratio": round_unlabeled_ratio(cfg, len(budgets) - 1),
               "last_round_stream": round_stream(cfg, len(budgets) - 1),
               "distill_steps": (round_steps(cfg, len(budgets))
                                 if cfg.distill_fraction is not None else None),
               "cold_start": cfg.strategy,
               "select": cfg.select, "replay_from": cfg.replay_from, "budgets": budgets,
               "seeds": seeds, "target": cfg.target,
               "first_budget_passing_target": passing["budget"] if passing else None,
               "rows": rows, "hardware": hardware(), "git_commit": git_commit()}
    write_json_atomic(out.with_suffix(".json"), summary)
    _log_curve(cfg, name, ckpt.name, rows, out.with_suffix(".png"))
    how = (f"replay_from={cfg.replay_from}" if cfg.replay_from is not None
           else f"cold={cfg.strategy} select={cfg.select}")
    print(f"checkpoint: {ckpt.folder}\nalgorithm={cfg.algorithm.name} {how}, {len(seeds)} seeds")
    print("| round | labels counted per seed | test accuracy (mean ± std) | wall time |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['round']} | {r['queries_per_seed']} | {r['mean']:.2%} ± {r['std']:.2%} | "
              f"{r['wall_time_s'] / 60:.1f} min |")
    print(f"first budget whose mean passes {cfg.target:.0%}: "
          f"{passing['budget'] if passing else 'none of ' + str(budgets)}\n"
          f"wrote {out}.csv, {out}.png and {out}.json")
    return summary
