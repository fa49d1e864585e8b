import json
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from omegaconf import DictConfig

from fewlabels.cli import main as cli_main
from fewlabels.config import compose
from fewlabels.evaluate import evaluate
from fewlabels.models.checkpoint import CheckpointError, open_checkpoint
from fewlabels.oracle import stats
from fewlabels.oracle.database import sqlite_path
from fewlabels.probe import features as features_module
from fewlabels.probe import run as probe_run
from fewlabels.probe.fit import KNNProbe, LabelPropagationProbe, LinearProbe, top_k
from fewlabels.probe.select import cluster, select_random, select_typiclust
from fewlabels.tracking import read_offline_run

POOL = 8000  # select among the first 8,000 training images: the real data, a small slice


def probe_config(ckpt: Path, tmp: Path, *overrides: str) -> DictConfig:
    return compose("probe", [f"checkpoint={ckpt}", f"results_dir={tmp / 'results'}",
                             f"logger.dir={tmp}", f"pool_limit={POOL}", *overrides])


@pytest.fixture(scope="module")
def unit_features(tiny_checkpoint: Path) -> np.ndarray:
    cfg = compose("probe", [f"checkpoint={tiny_checkpoint}", f"pool_limit={POOL}"])
    return probe_run.embedded(cfg).train


def test_random_selection_is_distinct_valid_deterministic_and_nested():
    ids = select_random(100, 60000, seed=3)
    assert len(set(ids.tolist())) == 100 and ids.min() >= 0 and ids.max() < 60000
    assert np.array_equal(ids, select_random(100, 60000, seed=3))
    assert not np.array_equal(ids, select_random(100, 60000, seed=4))
    assert np.array_equal(select_random(40, 60000, seed=3), ids[:40])
    with pytest.raises(ValueError, match="between 1 and 60000"):
        select_random(0, 60000, seed=0)


def test_typiclust_picks_one_typical_id_per_cluster(unit_features):
    x = unit_features
    ids = select_typiclust(x, 30, seed=0)
    assert len(set(ids.tolist())) == 30
    assert np.array_equal(ids, select_typiclust(x, 30, seed=0))
    assignment = cluster(x, 30, seed=0)
    assert sorted(assignment[ids].tolist()) == sorted(set(assignment.tolist()))
    # each pick is the most typical member of its own cluster
    from fewlabels.probe.select import typicality
    for i in ids:
        members = np.flatnonzero(assignment == assignment[i])
        t = typicality(x[members] / np.linalg.norm(x[members], axis=1, keepdims=True), 20)
        assert members[np.argmax(t)] == i


def _toy(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = np.eye(10, 16)[y] + noise * rng.standard_normal((n, 16))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


def test_probes_on_separable_toy_data():
    x, y = _toy(500, 0.05)
    ids = np.arange(100)
    for probe in (LinearProbe(), KNNProbe(k=5), LabelPropagationProbe(k=5, graph_k=10)):
        assert (probe.fit(x[:400], ids, y[ids]).predict(x[400:]) == y[400:]).mean() > 0.98


def test_label_propagation_uses_the_unlabeled_pool():
    """Two labels per class: kNN over the labels alone errs where the unlabeled graph helps."""
    x, y = _toy(3000, 0.2, seed=1)
    ids = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)])
    pool, test, test_y = x[:2000], x[2000:], y[2000:]
    ids = ids[ids < 2000]
    knn = (KNNProbe(k=20).fit(pool, ids, y[ids]).predict(test) == test_y).mean()
    lp = (LabelPropagationProbe(k=20).fit(pool, ids, y[ids]).predict(test) == test_y).mean()
    assert lp > knn + 0.02 and lp > 0.99
    cached = LabelPropagationProbe(k=20, query_neighbours=top_k(test, pool, 20))
    assert np.array_equal(cached.fit(pool, ids, y[ids]).predict(test),
                          LabelPropagationProbe(k=20).fit(pool, ids, y[ids]).predict(test))
    with pytest.raises(ValueError, match="other queries"):
        cached.predict(test[:10])
    result = evaluate(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]))
    assert result["test_accuracy"] == 0.75
    assert result["per_class_accuracy"][:3] == [1.0, 1.0, 0.5]
    assert result["confusion_matrix"][2][1] == 1


def test_probe_run_counts_queries_and_beats_chance(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = probe_config(tiny_checkpoint, tmp_path, "n=100", "seeds=2", "strategy=typiclust")
    summary = probe_run.probe(cfg)
    assert {r["probe"] for r in summary} == {"linear", "knn", "labelprop"}
    for row in summary:
        assert row["queries"] == 200 and row["mean"] > 0.4  # chance is 0.1
    revealed = {s.run_id: s.labels_revealed for s in stats()}
    sha = open_checkpoint(tiny_checkpoint).sha256[:8]
    assert revealed == {f"{tiny_checkpoint.name}-{sha}/typiclust/n100/seed{s}": 100
                        for s in (0, 1)}
    files = sorted((tmp_path / "results").glob("probe-*.json"))
    assert len(files) == 2
    rows = json.loads(files[0].read_text())
    assert [r["probe"] for r in rows] == ["linear", "knn", "labelprop"]
    assert rows[0]["n_queries"] == 100 and len(rows[0]["per_class_accuracy"]) == 10
    offline = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 2
    summary_logged = read_offline_run(offline[0])["summary"]
    assert summary_logged["n_queries"] == 100
    assert 0.4 < summary_logged["linear/test_accuracy"] <= 1

    monkeypatch.setenv("WANDB_MODE", "disabled")
    probe_run.probe(cfg)  # the same run ids again: no new label is revealed
    assert {s.run_id: s.labels_revealed for s in stats()} == revealed
    with sqlite3.connect(sqlite_path(os.environ["FEWLABELS_LABEL_DB"])) as conn:
        assert conn.execute("SELECT COUNT(*) FROM queries").fetchone()[0] == 200


def test_permuted_test_labels_change_no_query_and_no_prediction(tiny_checkpoint, tmp_path,
                                                                monkeypatch):
    """The whole probe command, with the real test labels and with permuted ones: the same ids
    are queried and the same predictions made; only the reported accuracy changes."""
    real = probe_run.load_test_set()
    permuted = type(real)(real.images, np.random.default_rng(0).permutation(real.labels))
    predictions: list[list[int]] = []
    real_evaluate = probe_run.evaluate
    monkeypatch.setattr(probe_run, "evaluate", lambda pred, labels: predictions.append(
        pred.tolist()) or real_evaluate(pred, labels))
    summaries, queried = [], []
    for tag, test_set in (("real-", real), ("permuted-", permuted)):
        monkeypatch.setattr(probe_run, "load_test_set", lambda test_set=test_set: test_set)
        cfg = probe_config(tiny_checkpoint, tmp_path, "n=40", "seeds=1", "strategy=typiclust",
                           f"run_tag={tag}")
        summaries.append(probe_run.probe(cfg))
        run_id = probe_run.oracle_run_id(cfg, open_checkpoint(tiny_checkpoint), "typiclust", 40,
                                         0)
        queried.append(sorted(i for i, _ in _queried(run_id)))
    n_probes = len(probe_run.PROBES)
    assert len(queried[0]) == 40 and queried[0] == queried[1]
    assert len(predictions) == 2 * n_probes
    assert predictions[:n_probes] == predictions[n_probes:]
    assert [r["mean"] for r in summaries[0]] != [r["mean"] for r in summaries[1]]


def _queried(run_id: str) -> list[tuple[int, str]]:
    with sqlite3.connect(sqlite_path(os.environ["FEWLABELS_LABEL_DB"])) as conn:
        return conn.execute("SELECT image_id, purpose FROM queries WHERE run_id = ?",
                            (run_id,)).fetchall()


def test_feature_cache_is_keyed_by_checkpoint_hash(tiny_checkpoint, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt_dir = tmp_path / "copy"
    shutil.copytree(tiny_checkpoint, ckpt_dir, ignore=shutil.ignore_patterns("features"))
    images = probe_run.load_train_images().images[:300]
    test_images = probe_run.load_test_set().images[:100]
    first = features_module.features(open_checkpoint(ckpt_dir), images, test_images)
    monkeypatch.setattr(features_module, "load_backbone", lambda c: pytest.fail("not cached"))
    cached = features_module.features(open_checkpoint(ckpt_dir), images, test_images)
    assert np.array_equal(first[0], cached[0])
    monkeypatch.undo()
    state = load_file(str(ckpt_dir / "backbone.safetensors"))
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()}
    save_file(state, str(ckpt_dir / "backbone.safetensors"))
    changed = features_module.features(open_checkpoint(ckpt_dir), images, test_images)
    assert not np.allclose(first[0], changed[0])
    assert len(list((ckpt_dir / "features").glob("*.npz"))) == 2


def test_a_retrained_checkpoint_of_the_same_name_buys_its_own_queries(tiny_checkpoint, tmp_path):
    """Typiclust picks other images on a new backbone: reusing the old run ids would refuse them
    for lack of budget (or, for random, silently mix two backbones under one id)."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt_dir = tmp_path / "simclr-retrained"
    shutil.copytree(tiny_checkpoint, ckpt_dir, ignore=shutil.ignore_patterns("features"))
    cfg = probe_config(ckpt_dir, tmp_path, "n=40", "seeds=1", "strategy=typiclust",
                       "probe=knn")
    before = probe_run.probe(cfg)[0]
    state = load_file(str(ckpt_dir / "backbone.safetensors"))
    save_file({k: v * 1.5 if v.is_floating_point() else v for k, v in state.items()},
              str(ckpt_dir / "backbone.safetensors"))  # what pretraining again would do
    after = probe_run.probe(cfg)[0]
    assert before["run_ids"] != after["run_ids"]
    revealed = {s.run_id: s.labels_revealed for s in stats()}
    assert revealed[before["run_ids"][0]] == revealed[after["run_ids"][0]] == 40


def test_missing_or_corrupted_checkpoint_is_a_clear_error(tiny_checkpoint, tmp_path, capsys):
    import shutil

    with pytest.raises(CheckpointError, match="backbone.safetensors is missing"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoint under .*make pretrain"):
        probe_run.embedded(compose("probe", [f"checkpoint_dir={tmp_path / 'empty'}"]))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken, ignore=shutil.ignore_patterns("features"))
    data = (broken / "backbone.safetensors").read_bytes()
    (broken / "backbone.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be (read|loaded).*corrupted"):
        features_module.load_backbone(open_checkpoint(broken))
    assert cli_main(["probe", f"checkpoint={broken}", "n=10", "seeds=1"]) == 2
    assert "corrupted" in capsys.readouterr().err
    assert cli_main(["probe", f"checkpoint={tiny_checkpoint}", "n=abc"]) == 2
    assert "n='abc': must be a whole number" in capsys.readouterr().err


def test_curve_and_search_end_to_end(tiny_checkpoint, tmp_path):
    cfg = probe_config(tiny_checkpoint, tmp_path, "seeds=2", "curve.ns=[10,40]",
                       "curve.strategies=[random]", "probe=knn")
    out = probe_run.curve(cfg)
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert lines[0] == "n,strategy,probe,seeds,mean,std,queries" and len(lines) == 3
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    cfg = probe_config(tiny_checkpoint, tmp_path, "seeds=2", "run_tag=search-",
                       "search.grid=[10,100]", "search.target=0.4", "search.resolution=30",
                       "search.probe=knn")
    result = probe_run.search(cfg)
    tried = [t["n"] for t in result["tried"]]
    assert tried[:2] == [10, 100] or 10 in tried and 100 in tried
    assert result["smallest_n"] is not None and 10 < result["smallest_n"] <= 100
    passing = {t["n"]: t["mean"] > 0.4 for t in result["tried"]}
    assert passing[result["smallest_n"]] and not passing[max(n for n in passing
                                                             if n < result["smallest_n"])]
    in_db = sum(s.labels_revealed for s in stats() if s.run_id.startswith("search-"))
    assert result["queries_recorded"] == in_db == 2 * sum(tried)
    assert result["distinct_images_revealed"] <= in_db


def test_typiclust_beyond_max_clusters_spreads_picks_evenly(unit_features):
    ids = select_typiclust(unit_features, 45, seed=1, max_clusters=10)
    assert len(set(ids.tolist())) == 45
    per_cluster = np.bincount(cluster(unit_features, 10, seed=1)[ids], minlength=10)
    assert per_cluster.min() >= 4 and per_cluster.max() <= 5


def test_curve_and_search_with_a_fine_tuned_learner(tiny_checkpoint, tmp_path):
    """LEARNER=: each N is the finetune command's run (its oracle runs, its results files)."""
    learner = ["learner=supervised", "learner_args=['preset=tiny','trainer.steps=5']",
               f"checkpoint_dir={tmp_path / 'ckpt'}", f"logger.dir={tmp_path}"]
    cfg = probe_config(tiny_checkpoint, tmp_path, "seeds=1", "curve.ns=[10,20]",
                       "curve.strategies=[random]", *learner)
    out = probe_run.curve(cfg)
    lines = out.with_suffix(".csv").read_text().splitlines()
    assert [line.split(",")[:3] for line in lines[1:]] == [["10", "random", "supervised"],
                                                          ["20", "random", "supervised"]]
    finetune_runs = {s.run_id: s.labels_revealed for s in stats()}
    assert sorted(finetune_runs.values()) == [10, 20]
    assert all(r.startswith("finetune/") for r in finetune_runs)
    assert len(list((tmp_path / "results").glob("finetune-*-supervised-random-n*.json"))) == 2
    assert [int(line.split(",")[-1]) for line in lines[1:]] == [10, 20]  # queries counted

    cfg = probe_config(tiny_checkpoint, tmp_path, "seeds=1", "search.grid=[10,20]",
                       "search.target=0.0", "search.resolution=100", "strategy=random", *learner)
    result = probe_run.search(cfg)  # N=10 passes a target of 0: read back, nothing new bought
    assert result["smallest_n"] is not None and result["probe"] == "supervised"
    assert {s.run_id: s.labels_revealed for s in stats()} == finetune_runs
    with pytest.raises(ValueError, match="learner='nope'"):
        probe_run.curve(probe_config(tiny_checkpoint, tmp_path, "learner=nope", "curve.ns=[10]"))
