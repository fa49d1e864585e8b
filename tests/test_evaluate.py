"""Test-time views (``fewlabels.evaluate``) and ``fewlabels evaluate`` on the final models of a tiny
real active loop (the tiny pretrained checkpoint, a 2,048-image pool, ten steps a round)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from fewlabels.active.evaluate_saved import evaluate_saved
from fewlabels.active.rounds import seeds_name
from fewlabels.active.run import active, active_run
from fewlabels.cli import main
from fewlabels.config import compose
from fewlabels.data import load_test_set
from fewlabels.data.transforms import normalize_uint8
from fewlabels.evaluate import mean_std, predict_probs
from fewlabels.models import open_checkpoint
from fewlabels.models.checkpoint import CLASSIFIER_FILE, load_classifier
from fewlabels.tracking import read_offline_run


def _linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))


def test_flip_views_average_an_image_and_its_mirror_so_a_mirrored_image_gets_the_same_answer():
    model = _linear_model().train()
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    x = normalize_uint8(images)
    with torch.no_grad():
        expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    flip = predict_probs(model, images, "flip", batch_size=4)
    assert torch.allclose(flip, expected, atol=1e-6)
    assert torch.allclose(flip.sum(1), torch.ones(6))
    mirrored = images.flip(-1)
    assert torch.allclose(predict_probs(model, mirrored, "flip"), flip, atol=1e-6)
    # without the mirror view the answer does depend on the side: the property is the views'
    assert not torch.allclose(predict_probs(model, mirrored, "none"),
                              predict_probs(model, images, "none"), atol=1e-3)
    assert model.training  # the model's mode is given back
    with pytest.raises(ValueError, match="unknown test-time views 'rot'"):
        predict_probs(model, images, "rot")


def test_mean_std_is_the_mean_and_sample_spread_over_seeds_and_zero_for_one_seed():
    assert mean_std([0.9]) == (pytest.approx(0.9), 0.0)
    mean, std = mean_std(np.array([0.88, 0.89, 0.90]))
    assert mean == pytest.approx(0.89) and std == pytest.approx(0.01)  # ddof=1, not 0.00816


def _loop(tiny_checkpoint, tmp, seeds: int, *overrides: str):
    cfg = compose("active", ["preset=tiny", f"checkpoint={tiny_checkpoint}",
                             "algorithm=supervised", "budgets=[10,20]", f"seeds={seeds}",
                             "trainer.steps=10", f"checkpoint_dir={tmp / 'ckpt'}",
                             f"results_dir={tmp / 'results'}", f"logger.dir={tmp}", *overrides])
    active(cfg)
    ckpt = open_checkpoint(tiny_checkpoint)
    return [active_run(cfg, ckpt, s) for s in range(seeds)]


def test_evaluate_reads_each_seeds_final_round_and_writes_the_run_with_its_counted_queries(
        tiny_checkpoint, tmp_path, monkeypatch):
    runs = _loop(tiny_checkpoint, tmp_path, seeds=2)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose("evaluate", [f"runs=[{runs[0].folder},{runs[1].folder}]", "views=flip",
                               f"results_dir={tmp_path / 'results'}", f"logger.dir={tmp_path}"])
    by_run = evaluate_saved(cfg)
    assert list(by_run) == [runs[0].name]
    rows = by_run[runs[0].name]
    assert [(r["seed"], r["round"], r["n_queries"]) for r in rows] == [(0, 1, 20), (1, 1, 20)]
    for r, run in zip(rows, runs, strict=True):
        recorded = json.loads((run.folder / "round1" / "round.json").read_text())
        recorded_pred = np.load(run.folder / "round1" / "test_predictions.npy")
        assert r["test_accuracy_recorded"] == recorded["test_accuracy"]
        # the plain figure is the round's model again: the same answers up to float noise
        assert abs(r["test_accuracy_plain"] - recorded["test_accuracy"]) <= 5e-4
        assert len(recorded_pred) == 10_000
        confusion = np.array(r["confusion_matrix"])
        assert confusion.sum() == 10_000
        assert confusion.trace() / 10_000 == pytest.approx(r["test_accuracy"])
    summary = json.loads((tmp_path / "results" / f"evaluate-{runs[0].name}-flip.json")
                         .read_text())
    assert summary["seeds"] == [0, 1] and summary["n_queries"] == [20, 20]
    assert summary["mean"] == pytest.approx(np.mean([r["test_accuracy"] for r in rows]))
    assert summary["std"] == pytest.approx(np.std([r["test_accuracy"] for r in rows], ddof=1))
    logged = [read_offline_run(p) for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")]
    evaluations = [r for r in logged if "test_accuracy_mean" in r["summary"]]
    assert len(evaluations) == 1
    assert evaluations[0]["summary"]["test_accuracy_mean"] == pytest.approx(summary["mean"])


def test_other_seeds_of_a_run_get_their_own_results_file_and_leave_the_first_seeds_file_alone(
        tiny_checkpoint, tmp_path, monkeypatch):
    """``make evaluate`` on seeds 3-5 of a run whose seeds 0-2 were evaluated before (a run
    confirmed on fresh seeds with ``first_seed=3``) must not overwrite their figures."""
    assert seeds_name("r", [1, 0]) == "r" and seeds_name("r", [5, 3, 4]) == "r-seeds3-5"
    assert seeds_name("r", [2]) == "r-seeds2-2" and seeds_name("r", [0, 2]) == "r-seeds0.2"
    monkeypatch.setenv("WANDB_MODE", "offline")
    runs = _loop(tiny_checkpoint, tmp_path, seeds=3)
    results = tmp_path / "results"

    def evaluate_seeds(seeds: list[int]) -> dict:
        cfg = compose("evaluate", [f"runs=[{','.join(str(runs[s].folder) for s in seeds)}]",
                                   "views=none", f"results_dir={results}",
                                   f"logger.dir={tmp_path}"])
        evaluate_saved(cfg)
        return json.loads((results / f"evaluate-{seeds_name(runs[0].name, seeds)}-none.json")
                          .read_text())

    first = evaluate_seeds([0, 1])
    assert first["seeds"] == [0, 1]
    assert evaluate_seeds([2])["seeds"] == [2]
    assert json.loads((results / f"evaluate-{runs[0].name}-none.json").read_text()) == first
    assert len(list(results.glob("evaluate-*.json"))) == 2


def _assert_refused(cases, results, tmp_path, capsys) -> None:
    """Each ``(overrides, message)`` makes ``fewlabels evaluate`` exit 2 with ``message`` and no
    traceback."""
    for overrides, message in cases:
        code = main(["evaluate", *overrides.split(), f"results_dir={results}",
                     f"logger.dir={tmp_path}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (overrides, err)


def test_evaluate_says_what_to_give_for_bad_folders_and_views_and_writes_nothing(
        tiny_checkpoint, tmp_path, capsys, monkeypatch):
    run = _loop(tiny_checkpoint, tmp_path, seeds=1)[0]
    results = tmp_path / "results"
    before = sorted(results.iterdir())
    no_model = tmp_path / "ckpt" / "finetuned" / f"{run.name}-seed7"
    shutil.copytree(run.folder, no_model)
    (no_model / "round1" / CLASSIFIER_FILE).unlink()
    unfinished = tmp_path / "ckpt" / "finetuned" / f"{run.name}-seed8"
    shutil.copytree(run.folder, unfinished)
    for k in (0, 1):
        (unfinished / f"round{k}" / "round.json").unlink()
    cases = [(f"runs=[{tmp_path / 'nowhere-seed0'}]", "is not an active seed folder"),
             (f"runs=[{tmp_path}]", "is not an active seed folder"),
             (f"runs=[{run.folder},{no_model}]", f"has no {CLASSIFIER_FILE}"),
             (f"runs=[{unfinished}]", "has no finished round"),
             ("runs=[]", "give the seed folders"),
             (f"runs=[{run.folder},{run.folder}]", "given more than once"),
             (f"runs=[{run.folder}] views=rot", "views='rot': use one of none, flip")]
    _assert_refused(cases, results, tmp_path, capsys)
    # a database that does not hold the round's queries: its count would not be this database's
    monkeypatch.setenv("FEWLABELS_LABEL_DB", f"sqlite:///{tmp_path / 'other.sqlite'}")
    code = main(["evaluate", f"runs=[{run.folder}]", f"results_dir={results}",
                 f"logger.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "0 of them on record" in err and "Traceback" not in err, err
    assert sorted(results.iterdir()) == before  # every folder is checked before any is evaluated


def test_an_ensemble_of_a_run_and_its_stream_branch_is_their_mean_softmax_on_the_same_ids(
        tiny_checkpoint, tmp_path, monkeypatch):
    """``ensemble=true`` on two seeds of a run and of its ``last_round_stream=1`` branch (given
    in another order for seed 1): per seed the mean of the two final models' softmax outputs,
    each member's own figure beside, and the labels counted are the distinct ids of both oracle
    runs together: the same 20 ids, so 20, not 40."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    source = _loop(tiny_checkpoint, tmp_path, 2)
    branch = _loop(tiny_checkpoint, tmp_path, 2, "last_round_stream=1",
                   f"branch_from={source[0].name}")
    assert branch[0].name == source[0].name + "-stream1"
    folders = [source[0].folder, branch[0].folder, branch[1].folder, source[1].folder]
    cfg = compose("evaluate", [f"runs=[{','.join(map(str, folders))}]", "views=none",
                               "ensemble=true", f"results_dir={tmp_path / 'results'}",
                               f"logger.dir={tmp_path}"])
    ((name, rows),) = evaluate_saved(cfg).items()
    assert name.startswith(f"{source[0].name}-ensemble2-")
    test = load_test_set()
    for row, seed in zip(rows, (0, 1), strict=True):
        members = [source[seed], branch[seed]]
        assert row["seed"] == seed and [m["run"] for m in row["members"]] == \
            [source[0].name, branch[0].name]  # the first seed's order, for every seed
        ids = [json.loads((m.folder / "round1" / "round.json").read_text())["ids"]
               for m in members]
        assert sorted(ids[0]) == sorted(ids[1]) and len(set(ids[0])) == 20
        assert row["n_queries"] == 20 and [m["n_queries"] for m in row["members"]] == [20, 20]
        probs = [predict_probs(load_classifier(m.folder / "round1" / CLASSIFIER_FILE),
                               torch.from_numpy(test.images)) for m in members]
        joint = (probs[0] + probs[1]).argmax(1).numpy()
        assert row["test_accuracy"] == pytest.approx(float((joint == test.labels).mean()))
        alone = [float((p.argmax(1).numpy() == test.labels).mean()) for p in probs]
        assert [m["test_accuracy"] for m in row["members"]] == pytest.approx(alone)
        # two members that differ: the ensemble is not one of them renamed
        assert not np.array_equal(joint, probs[0].argmax(1).numpy()) or \
            not np.array_equal(joint, probs[1].argmax(1).numpy())
    summary = json.loads((tmp_path / "results" / f"evaluate-{name}-none.json").read_text())
    assert summary["members"] == [source[0].name, branch[0].name] and summary["ensemble"]
    assert summary["n_queries"] == [20, 20]
    assert summary["mean"] == pytest.approx(np.mean([r["test_accuracy"] for r in rows]))
    assert summary["member_means"][branch[0].name]["mean"] == pytest.approx(
        np.mean([r["members"][1]["test_accuracy"] for r in rows]))
    logged = [read_offline_run(p) for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")]
    ensembles = [r for r in logged if r["summary"].get("ensemble_members") == 2]
    assert len(ensembles) == 1
    assert ensembles[0]["summary"]["test_accuracy_mean"] == pytest.approx(summary["mean"])


def test_an_ensemble_of_members_revealed_different_ids_counts_their_union(
        tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    typiclust = _loop(tiny_checkpoint, tmp_path, 1)[0]
    other = _loop(tiny_checkpoint, tmp_path, 1, "strategy=random")[0]
    ids = [set(json.loads((run.folder / "round1" / "round.json").read_text())["ids"])
           for run in (typiclust, other)]
    assert ids[0] != ids[1]
    cfg = compose("evaluate", [f"runs=[{typiclust.folder},{other.folder}]", "views=none",
                               "ensemble=true", f"results_dir={tmp_path / 'results'}",
                               f"logger.dir={tmp_path}"])
    ((name, (row,)),) = evaluate_saved(cfg).items()
    assert name.startswith(f"{typiclust.name}-ensemble2-")
    assert row["n_queries"] == len(ids[0] | ids[1]) > 20
    assert f"the ensemble counts their union, {row['n_queries']} labels, not 20" in \
        capsys.readouterr().out


def test_an_ensemble_says_what_to_give_for_members_that_are_not_one_per_run_and_seed(
        tiny_checkpoint, tmp_path, capsys):
    source = _loop(tiny_checkpoint, tmp_path, 2)
    other = _loop(tiny_checkpoint, tmp_path, 1, "strategy=random")[0]
    results = tmp_path / "results"
    before = sorted(results.iterdir())
    cases = [(f"runs=[{source[0].folder},{source[1].folder}] ensemble=true",
              "give two or more seed folders of different runs for each seed"),
             (f"runs=[{source[0].folder},{other.folder},{source[1].folder}] ensemble=true",
              "give the same member runs for every seed"),
             (f"runs=[{source[0].folder}] ensemble=yes", "ensemble='yes': use true"),
             (f"runs=[{source[0].folder}] ensemble=1", "ensemble=1: use true")]
    _assert_refused(cases, results, tmp_path, capsys)
    assert sorted(results.iterdir()) == before
