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
from fewlabels.active.run import active, active_run
from fewlabels.cli import main
from fewlabels.config import compose
from fewlabels.data.transforms import normalize_uint8
from fewlabels.evaluate import mean_std, predict_probs
from fewlabels.models import open_checkpoint
from fewlabels.models.checkpoint import CLASSIFIER_FILE
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


def _loop(tiny_checkpoint, tmp, seeds: int):
    cfg = compose("active", ["preset=tiny", f"checkpoint={tiny_checkpoint}",
                             "algorithm=supervised", "budgets=[10,20]", f"seeds={seeds}",
                             "trainer.steps=10", f"checkpoint_dir={tmp / 'ckpt'}",
                             f"results_dir={tmp / 'results'}", f"logger.dir={tmp}"])
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
    for overrides, message in cases:
        code = main(["evaluate", *overrides.split(), f"results_dir={results}",
                     f"logger.dir={tmp_path}"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (overrides, err)
    # a database that does not hold the round's queries: its count would not be this database's
    monkeypatch.setenv("FEWLABELS_LABEL_DB", f"sqlite:///{tmp_path / 'other.sqlite'}")
    code = main(["evaluate", f"runs=[{run.folder}]", f"results_dir={results}",
                 f"logger.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and "0 of them on record" in err and "Traceback" not in err, err
    assert sorted(results.iterdir()) == before  # every folder is checked before any is evaluated
