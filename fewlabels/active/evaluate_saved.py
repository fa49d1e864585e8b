"""``fewlabels evaluate``: the final models of finished active runs on the test set, asked about
test-time views (``fewlabels.evaluate.TEST_VIEWS``: ``flip`` averages the softmax over an image
and its mirror). Nothing is trained and no label is bought; the figures are the same models'
with another evaluation, and choose nothing.

Per seed folder (``checkpoints/finetuned/active-<run>-seed<S>``): the last round with a
``round.json`` and its ``model.safetensors``; the queries it reports are checked against the label
database (``check_recorded``), and the plain prediction is computed again beside the recorded
``test_accuracy``, so that a model that is not the round's shows. Seeds of one run are grouped:
``results/evaluate-<run>-<views>.json`` (per seed and mean ± std) and one W&B run per group
(``job_type=evaluate``); seeds other than 0, 1, …, n-1 add theirs to the name (``-seeds3-5``,
``rounds.seeds_name``), so that they do not overwrite the first seeds' file.

``ensemble=true``: the folders given for one seed are the members of one classifier, the mean of
their softmax outputs (equal weights, each member asked about ``views``). Every seed must have
the same member runs (e.g. a run and its ``last_round_stream=1`` branch), and the labels the
ensemble counts are the distinct ids the database revealed to its members' oracle runs together;
each member's own figure is reported beside. ``results/evaluate-<first member run>-ensemble<K>-
<digest of the member runs>-<views>.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from fewlabels.active.rounds import ROUND_FILE, round_folders, seeds_name
from fewlabels.data import load_test_set
from fewlabels.evaluate import TEST_VIEWS, evaluate, mean_std, predict_probs
from fewlabels.files import sha256_file, write_json_atomic
from fewlabels.models.checkpoint import CLASSIFIER_FILE, CONFIG_FILE, load_classifier
from fewlabels.oracle import check_recorded, distinct_ids_revealed
from fewlabels.runtime import git_commit
from fewlabels.tracking import init_run

SEED_FOLDER = re.compile(r"^(?P<run>active-.+)-seed(?P<seed>\d+)$")


@dataclass(frozen=True)
class FinalRound:
    """One seed folder's last finished round: where its model is and what it recorded."""

    run: str        # the run's name, shared by its seeds
    seed: int
    folder: Path    # round<k>/
    record: dict[str, Any]


def final_round(seed_folder: Path) -> FinalRound:
    """The last finished round of an active seed folder; ValueError, saying what to give, for
    anything else."""
    match = SEED_FOLDER.match(seed_folder.name)
    if not seed_folder.is_dir() or match is None or not (seed_folder / CONFIG_FILE).is_file():
        raise ValueError(f"{seed_folder} is not an active seed folder: give folders such as "
                         "checkpoints/finetuned/active-<run>-seed<S> (printed by 'make active', "
                         "with config.yaml and round<k>/ inside)")
    rounds = [p for p in round_folders(seed_folder) if (p / ROUND_FILE).is_file()]
    if not rounds:
        raise ValueError(f"{seed_folder} has no finished round (round<k>/{ROUND_FILE}): finish "
                         "it with the 'make active' command that started it")
    last = rounds[-1]
    if not (last / CLASSIFIER_FILE).is_file():
        raise ValueError(f"{last} has no {CLASSIFIER_FILE}: its model was not kept here; copy "
                         "the round folder from the machine that trained it, or train it again")
    return FinalRound(match["run"], int(match["seed"]), last,
                      json.loads((last / ROUND_FILE).read_text()))


def provenance(final: FinalRound) -> dict[str, Any]:
    """What a row says about the round it evaluates: its record, folder and model hash."""
    return {"round": final.record["round"], "n_queries": final.record["n_queries"],
            "oracle_run_id": final.record["oracle_run_id"], "folder": str(final.folder),
            "model_sha256": sha256_file(final.folder / CLASSIFIER_FILE),
            "test_accuracy_recorded": final.record["test_accuracy"]}


def evaluate_round(final: FinalRound, images: np.ndarray, labels: np.ndarray, views: str,
                   batch_size: int) -> dict[str, Any]:
    """The round's model on the test set with and without ``views``."""
    model = load_classifier(final.folder / CLASSIFIER_FILE)
    x = torch.from_numpy(images)
    plain = evaluate(predict_probs(model, x, "none", batch_size).argmax(1).numpy(), labels)
    viewed = evaluate(predict_probs(model, x, views, batch_size).argmax(1).numpy(), labels)
    return {"seed": final.seed, **provenance(final), "views": views,
            "test_accuracy": viewed["test_accuracy"],
            "per_class_accuracy": viewed["per_class_accuracy"],
            "confusion_matrix": viewed["confusion_matrix"],
            "test_accuracy_plain": plain["test_accuracy"]}


def ensemble_members(finals: list[FinalRound]) -> dict[int, list[FinalRound]]:
    """The members of each seed's ensemble, in the order given for the first seed; ValueError,
    saying what to give, unless every seed has the same two or more member runs."""
    by_seed: dict[int, list[FinalRound]] = {}
    for final in finals:
        by_seed.setdefault(final.seed, []).append(final)
    runs = {seed: [m.run for m in members] for seed, members in by_seed.items()}
    first_seed, first = next(iter(runs.items()))
    if len(first) < 2 or len(set(first)) < len(first):
        raise ValueError(f"ensemble=true: seed {first_seed} has the members {first}; give two or "
                         "more seed folders of different runs for each seed (e.g. a run's "
                         "folder and its last_round_stream=1 branch's folder of the same seed)")
    for seed, members in runs.items():
        if sorted(members) != sorted(first):
            raise ValueError(f"ensemble=true: seed {seed} has the members {members} but seed "
                             f"{first_seed} has {first}; give the same member runs for every "
                             "seed, or the seeds would not be one classifier's row")
        by_seed[seed] = sorted(by_seed[seed], key=lambda m: first.index(m.run))
    return by_seed


def evaluate_ensemble(members: list[FinalRound], images: np.ndarray, labels: np.ndarray,
                      views: str, batch_size: int) -> dict[str, Any]:
    """One seed's members on the test set: the mean of their softmax outputs, each member's own
    figure, and the distinct ids their oracle runs were revealed together."""
    x = torch.from_numpy(images)
    probs, rows = [], []
    for member in members:
        member_probs = predict_probs(load_classifier(member.folder / CLASSIFIER_FILE), x, views,
                                     batch_size)
        probs.append(member_probs)
        rows.append({"run": member.run, **provenance(member),
                     "test_accuracy": evaluate(member_probs.argmax(1).numpy(),
                                               labels)["test_accuracy"]})
    joint = evaluate(torch.stack(probs).mean(0).argmax(1).numpy(), labels)
    n_queries = distinct_ids_revealed(sorted({r["oracle_run_id"] for r in rows}))
    return {"seed": members[0].seed, "n_queries": n_queries, "views": views,
            "test_accuracy": joint["test_accuracy"],
            "per_class_accuracy": joint["per_class_accuracy"],
            "confusion_matrix": joint["confusion_matrix"], "members": rows}


def evaluate_saved(cfg: DictConfig) -> dict[str, list[dict[str, Any]]]:
    """Every seed folder in ``cfg.runs`` evaluated with ``cfg.views`` (with ``cfg.ensemble``,
    each seed's folders as one ensemble); rows per run."""
    if cfg.views not in TEST_VIEWS:
        raise ValueError(f"views={cfg.views!r}: use one of {', '.join(TEST_VIEWS)}")
    if not isinstance(cfg.ensemble, bool):
        raise ValueError(f"ensemble={cfg.ensemble!r}: use true (each seed's folders are one "
                         "ensemble) or false")
    if not cfg.runs:
        raise ValueError("runs=[]: give the seed folders to evaluate, e.g. "
                         "RUNS=\"checkpoints/finetuned/active-<run>-seed0 …\"")
    folders = [Path(str(folder)).resolve() for folder in cfg.runs]
    twice = sorted({str(f) for f in folders if folders.count(f) > 1})
    if twice:
        raise ValueError(f"runs: {', '.join(twice)} given more than once; give each seed folder "
                         "once, or its seed would count twice in the mean")
    finals = [final_round(folder) for folder in folders]  # all checked before any is evaluated
    by_seed = ensemble_members(finals) if cfg.ensemble else {}
    for final in finals:
        check_recorded(final.record["oracle_run_id"], final.record["n_queries"],
                       final.folder / ROUND_FILE)
    if cfg.ensemble:
        return _evaluate_ensembles(cfg, by_seed)
    test = load_test_set()
    by_run: dict[str, list[dict[str, Any]]] = {}
    for final in finals:
        row = evaluate_round(final, test.images, test.labels, cfg.views, cfg.batch_size)
        by_run.setdefault(final.run, []).append(row)
        print(f"  {final.folder}: {row['n_queries']} labels counted, test accuracy "
              f"{row['test_accuracy']:.2%} with views={cfg.views} (plain "
              f"{row['test_accuracy_plain']:.2%}; recorded {row['test_accuracy_recorded']:.2%})",
              flush=True)
    for run, rows in by_run.items():
        _write(cfg, run, rows)
    return by_run


def _evaluate_ensembles(cfg: DictConfig, by_seed: dict[int, list[FinalRound]],
                        ) -> dict[str, list[dict[str, Any]]]:
    test = load_test_set()
    first = next(iter(by_seed.values()))
    # the member runs named by a digest: two ensembles of one run do not share a file
    digest = hashlib.sha256("\n".join(m.run for m in first).encode()).hexdigest()[:8]
    # other seeds of the same members (first_seed=3) get their own file and W&B run
    name = seeds_name(f"{first[0].run}-ensemble{len(first)}-{digest}", list(by_seed))
    rows = []
    for seed, members in by_seed.items():
        row = evaluate_ensemble(members, test.images, test.labels, cfg.views, cfg.batch_size)
        rows.append(row)
        own = ", ".join(f"{m['test_accuracy']:.2%} ({m['n_queries']} labels)"
                        for m in row["members"])
        print(f"  seed {seed}: {len(members)} members, {row['n_queries']} distinct labels "
              f"counted, test accuracy {row['test_accuracy']:.2%} with views={cfg.views} "
              f"(members alone: {own})", flush=True)
        most = max(m["n_queries"] for m in row["members"])
        if row["n_queries"] > most:
            print(f"  seed {seed}: the members were revealed different ids: the ensemble counts "
                  f"their union, {row['n_queries']} labels, not {most}", flush=True)
    members = [m.run for m in first]
    mean, std = mean_std([r["test_accuracy"] for r in rows])
    member_means = {run: mean_std([m["test_accuracy"] for r in rows for m in r["members"]
                                   if m["run"] == run]) for run in members}
    summary = {"run": name, "members": members, "views": cfg.views, "ensemble": True,
               "seeds": [r["seed"] for r in rows], "n_queries": [r["n_queries"] for r in rows],
               "mean": mean, "std": std,
               "member_means": {run: {"mean": m, "std": s} for run, (m, s) in member_means.items()},
               "rows": rows, "git_commit": git_commit()}
    out = _save(cfg, name, summary)
    print(f"{name}: {mean:.2%} ± {std:.2%} with views={cfg.views} over seeds "
          f"{summary['seeds']}, {summary['n_queries']} labels counted; members alone: "
          + ", ".join(f"{m:.2%} ± {s:.2%}" for m, s in member_means.values()) + f"; {out}",
          flush=True)
    _log(cfg, name, first[0].run,
         ["seed", "n_queries", "test_accuracy",
          *[f"member{i}_test_accuracy" for i in range(len(members))]],
         [[r["seed"], r["n_queries"], r["test_accuracy"],
           *[m["test_accuracy"] for m in r["members"]]] for r in rows],
         {"test_accuracy_mean": mean, "test_accuracy_std": std, "views": cfg.views,
          "n_seeds": len(rows), "ensemble_members": len(members)})
    return {name: rows}


def _save(cfg: DictConfig, name: str, summary: dict[str, Any]) -> Path:
    out = Path(cfg.results_dir) / f"evaluate-{name}-{cfg.views}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, summary)
    return out


def _log(cfg: DictConfig, name: str, group: str, columns: list[str], data: list[list[Any]],
         wandb_summary: dict[str, Any]) -> None:
    """One W&B run (``job_type=evaluate``): the per-seed table and the summary figures."""
    wandb_run = init_run(cfg, name=f"evaluate-{name}-{cfg.views}", group=group,
                         job_type="evaluate")
    import wandb

    wandb_run.log({"evaluate/seeds": wandb.Table(columns=columns, data=data)})
    wandb_run.summary.update(wandb_summary)
    wandb_run.finish()


def _write(cfg: DictConfig, run: str, rows: list[dict[str, Any]]) -> None:
    mean, std = mean_std([r["test_accuracy"] for r in rows])
    mean_plain, std_plain = mean_std([r["test_accuracy_plain"] for r in rows])
    summary = {"run": run, "views": cfg.views, "seeds": [r["seed"] for r in rows],
               "n_queries": [r["n_queries"] for r in rows], "mean": mean, "std": std,
               "mean_plain": mean_plain, "std_plain": std_plain, "rows": rows,
               "git_commit": git_commit()}
    name = seeds_name(run, summary["seeds"])  # other seeds of a run get their own file
    out = _save(cfg, name, summary)
    print(f"{name}: {summary['mean']:.2%} ± {summary['std']:.2%} with views={cfg.views} over "
          f"seeds {summary['seeds']} (plain {summary['mean_plain']:.2%} ± "
          f"{summary['std_plain']:.2%}); {out}", flush=True)
    _log(cfg, name, run, ["seed", "n_queries", "test_accuracy", "test_accuracy_plain"],
         [[r["seed"], r["n_queries"], r["test_accuracy"], r["test_accuracy_plain"]]
          for r in rows],
         {"test_accuracy_mean": summary["mean"], "test_accuracy_std": summary["std"],
          "test_accuracy_plain_mean": summary["mean_plain"], "views": cfg.views,
          "n_seeds": len(rows)})
