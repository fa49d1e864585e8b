"""Active rounds: the acquisitions and ProbCover on small arrays, and tiny real loops (the tiny
pretrained checkpoint, a 2,048-image pool, ten steps a round)."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fewlabels.active import badge, entropy, margin
from fewlabels.active import run as active_module
from fewlabels.active.replay import replay_tag
from fewlabels.active.run import active, active_run
from fewlabels.config import compose
from fewlabels.models import open_checkpoint
from fewlabels.models.checkpoint import (
    CLASSIFIER_FILE,
    FINETUNED_DIR,
    load_classifier,
    weights_metadata,
)
from fewlabels.oracle import distinct_ids_revealed, stats
from fewlabels.probe.select import select_probcover


def active_config(ckpt: Path, tmp: Path, *overrides: str):
    return compose("active", ["preset=tiny", f"checkpoint={ckpt}", "algorithm=supervised",
                              "budgets=[10,20,30]", "seeds=1", "trainer.steps=10",
                              f"checkpoint_dir={tmp / 'ckpt'}", f"results_dir={tmp / 'results'}",
                              f"logger.dir={tmp}", *overrides])


def purposes(tmp: Path) -> dict[int, str]:
    with sqlite3.connect(tmp / "labels.sqlite") as conn:
        return dict(conn.execute("SELECT image_id, purpose FROM queries").fetchall())


def copy_to_clone(kept: list[Path], backbone_files: list[Path], tmp: Path, clone: Path) -> Path:
    """Copy what ``make keep`` names into ``clone`` as a fresh clone would hold it; the
    backbone folder's path there."""
    import shutil

    for path in kept:
        target = clone / "ckpt" / path.relative_to(tmp / "ckpt")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    backbone = clone / "backbones" / backbone_files[0].parent.name
    backbone.mkdir(parents=True)
    for path in backbone_files:
        shutil.copyfile(path, backbone / path.name)
    return backbone


def interrupted(cfg, ckpt: Path, dying_fit, monkeypatch):
    """Run the loop of ``cfg`` with ``dying_fit`` in place of ``fit`` until it raises
    KeyboardInterrupt (a session's end); the label database's ledger then, and seed 0's run."""
    from fewlabels.oracle.database import export_ledger

    monkeypatch.setattr(active_module, "fit", dying_fit)
    with pytest.raises(KeyboardInterrupt):
        active(cfg)
    return export_ledger(), active_run(cfg, open_checkpoint(ckpt), 0)


def test_margin_and_entropy_pick_the_least_sure_unlabeled_images():
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.5, 0.5], [0.7, 0.3], [0.51, 0.49]])
    feats = np.zeros((5, 3))
    assert margin(probs, feats, np.array([2]), 2, seed=0).tolist() == [4, 1]
    assert entropy(probs, feats, np.array([2]), 2, seed=0).tolist() == [4, 1]
    with pytest.raises(ValueError, match="only 4 unlabeled"):
        margin(probs, feats, np.array([2]), 5, seed=0)


def test_badge_starts_at_the_largest_gradient_and_spreads():
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(0, 0.01, (50, 4)) + [5, 0, 0, 0],
                            rng.normal(0, 0.01, (50, 4)) + [0, 5, 0, 0]])
    probs = np.full((100, 3), [0.6, 0.3, 0.1])
    probs[7] = [0.34, 0.33, 0.33]  # the least sure: the largest gradient embedding
    picks = badge(probs, feats, np.array([0, 1]), 2, seed=0)
    assert picks[0] == 7
    assert {int(p) // 50 for p in picks} == {0, 1}  # the second pick comes from the other blob
    many = badge(probs, feats, np.array([0, 1]), 20, seed=1)
    assert len(set(many.tolist())) == 20 and not {0, 1} & set(many.tolist())


def test_probcover_covers_each_blob_before_repeating_one():
    rng = np.random.default_rng(0)
    centres = np.eye(8) * 10
    x = np.concatenate([c + rng.normal(0, 0.3, (60, 8)) for c in centres])
    ids = select_probcover(x, 8, seed=0, n_clusters=8)
    assert sorted(int(i) // 60 for i in ids) == list(range(8))
    more = select_probcover(x, 20, seed=0, n_clusters=8)
    assert len(set(more.tolist())) == 20 and more[:8].tolist() == ids.tolist()


def test_active_rounds_stay_in_budget_record_rounds_and_write_the_curve(tiny_checkpoint, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = active_config(tiny_checkpoint, tmp_path)
    summary = active(cfg)
    run = active_run(cfg, open_checkpoint(tiny_checkpoint), 0)
    assert {s.run_id: (s.budget, s.labels_revealed) for s in stats()} == {
        run.oracle_run_id: (30, 30)}
    rounds = [json.loads((run.folder / f"round{k}" / "round.json").read_text())
              for k in range(3)]
    assert [r["n_queries"] for r in rounds] == [10, 20, 30]
    assert [r["how"] for r in rounds] == ["typiclust", "margin", "margin"]
    assert [r["steps"] for r in rounds] == [10, 2, 2]  # warm rounds: round_fraction of the steps
    ids = [r["ids"] for r in rounds]
    for earlier, later in zip(ids, ids[1:], strict=False):
        assert later[:len(earlier)] == earlier and len(set(later)) == len(later)
    recorded = purposes(tmp_path)
    assert len(recorded) == 30
    for k, r in enumerate(rounds):
        new = r["ids"][len(ids[k - 1]) if k else 0:]
        assert {recorded[i] for i in new} == {f"round{k}"}

    out = tmp_path / "results" / run.name
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["queries_per_seed"]) for r in rows] == [10, 20, 30]
    assert [float(r["mean"]) for r in rows] == pytest.approx(
        [r["test_accuracy"] for r in rounds])
    assert out.with_suffix(".png").stat().st_size > 0
    assert summary["first_budget_passing_target"] is None  # ten steps do not reach 90%
    from fewlabels.tracking import read_offline_run

    runs = [read_offline_run(p) for p in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")]
    per_round = [r for r in runs if "round/test_accuracy" in {k for h in r["history"] for k in h}]
    assert sorted(r["summary"]["n_queries"] for r in per_round) == [10, 20, 30]
    curve_keys = {k for r in runs for h in r["history"] for k in h}
    for logged in ("curve/table/", "curve/accuracy_table/"):  # the table and the line plot
        assert any(k.startswith(logged) for k in curve_keys), logged

    # Again: every round is read back; nothing is trained or revealed.
    real_fit = active_module.fit
    monkeypatch.setattr(active_module, "fit", lambda *a, **k: pytest.fail("trained again"))
    again = active(cfg)
    assert again["rows"] == summary["rows"]
    assert len(purposes(tmp_path)) == 30

    # Another seed set writes its own curve and leaves this one as it was.
    before = out.with_suffix(".csv").read_text()
    monkeypatch.setattr(active_module, "fit", real_fit)
    active(active_config(tiny_checkpoint, tmp_path, "first_seed=1"))
    assert (tmp_path / "results" / f"{run.name}-seeds1-1.csv").exists()
    assert out.with_suffix(".csv").read_text() == before


def test_a_loop_carried_to_a_fresh_clone_continues_from_the_files_make_keep_adds(
        tiny_checkpoint, tmp_path, monkeypatch, keep):
    """What ``make keep`` puts in git (scripts/keep.py), copied into an empty checkpoint folder
    with a new label database, as a fresh clone on another machine would have them: the finished
    rounds are refused until the ledger is imported, then read back, and the round the kill
    interrupted trains from the kept model without buying anything new."""
    from fewlabels.oracle import LabelDatabaseError
    from fewlabels.oracle.database import import_ledger

    cfg = active_config(tiny_checkpoint, tmp_path)
    real_fit = active_module.fit

    def dies_in_round_2(*args, **kwargs):
        if "round 2" in args[4]:
            raise KeyboardInterrupt  # the end of a session, after round 2's ids were bought
        return real_fit(*args, **kwargs)

    ledger, run = interrupted(cfg, tiny_checkpoint, dies_in_round_2, monkeypatch)
    kept = keep.files_to_keep(run.folder)
    assert sorted(str(p.relative_to(run.folder)) for p in kept) == [
        "config.yaml", "round0/model.safetensors", "round0/round.json", "round0/selection.json",
        "round1/model.safetensors",
        "round1/round.json", "round1/selection.json", "round2/selection.json"]
    backbone_files = keep.files_to_keep(tiny_checkpoint)
    assert {p.name for p in backbone_files} == {"backbone.safetensors", "config.yaml",
                                                "provenance.json"}

    clone = tmp_path / "clone"
    backbone = copy_to_clone(kept, backbone_files, tmp_path, clone)
    monkeypatch.setenv("FEWLABELS_LABEL_DB", f"sqlite:///{clone / 'labels.sqlite'}")
    carried = active_config(backbone, clone)
    trained = []
    monkeypatch.setattr(active_module, "fit", lambda *a, **k: (trained.append(a[4]),
                                                               real_fit(*a, **k))[1])
    with pytest.raises(LabelDatabaseError, match=r"round0.*10 labels.*has 0.*oracle import"):
        active(carried)
    import_ledger(ledger)
    summary = active(carried)
    assert [t.split()[-1] for t in trained] == ["2"]
    assert [r["queries_per_seed"] for r in summary["rows"]] == [10, 20, 30]
    assert {s.run_id: s.labels_revealed for s in stats()} == {run.oracle_run_id: 30}


def test_a_round_killed_mid_training_resumes_at_its_step_in_a_fresh_clone_with_its_state(
        tiny_checkpoint, tmp_path, monkeypatch, keep):
    """``make keep UNFINISHED=1`` adds the interrupted round's ``last.ckpt`` (and its W&B id) to
    what a fresh clone gets: there the round resumes at the step it reached, buys nothing new,
    and ends by its configured steps; kept again afterwards, that state is untracked."""
    from fewlabels.oracle.database import import_ledger

    four_steps = ("round_fraction=0.4", "trainer.steps_per_epoch=2")  # last.ckpt every 2 steps
    cfg = active_config(tiny_checkpoint, tmp_path, *four_steps)
    real_fit = active_module.fit

    def dies_halfway_in_round_2(round_cfg, learner, folder, logger, name):
        if name.endswith("round 2"):  # the end of a session, half-way through the last round
            half = OmegaConf.merge(round_cfg, {"trainer": {"steps": round_cfg.trainer.steps // 2}})
            real_fit(half, learner, folder, logger, name)
            raise KeyboardInterrupt
        return real_fit(round_cfg, learner, folder, logger, name)

    ledger, run = interrupted(cfg, tiny_checkpoint, dies_halfway_in_round_2, monkeypatch)
    plain = keep.files_to_keep(run.folder)
    with_state = keep.files_to_keep(run.folder, training_state=True)
    assert sorted(str(p.relative_to(run.folder)) for p in set(with_state) - set(plain)) == [
        "round2/last.ckpt", "round2/wandb_run_id"]

    clone = tmp_path / "clone"
    backbone = copy_to_clone(with_state, keep.files_to_keep(tiny_checkpoint), tmp_path, clone)
    monkeypatch.setenv("FEWLABELS_LABEL_DB", f"sqlite:///{clone / 'labels.sqlite'}")
    import_ledger(ledger)
    resumed = []

    def records_the_start(round_cfg, learner, folder, logger, name):
        fitted = real_fit(round_cfg, learner, folder, logger, name)
        resumed.append((name.split()[-1], learner.start_step, fitted.steps))
        return fitted

    monkeypatch.setattr(active_module, "fit", records_the_start)
    carried = clone / "ckpt" / run.folder.relative_to(tmp_path / "ckpt")
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run(["git", "-C", str(carried), "add", "-f", "."], check=True)  # as committed
    summary = active(active_config(backbone, clone, *four_steps))
    assert resumed == [("2", 2, 4)]  # round 2 only, from step 2 of its 4
    assert [r["queries_per_seed"] for r in summary["rows"]] == [10, 20, 30]
    assert {s.run_id: s.labels_revealed for s in stats()} == {run.oracle_run_id: 30}
    # Kept again now that round 2 has ended: its training state and round 0's model (no longer
    # among the last two finished) are what make keep untracks.
    for training_state in (False, True):
        stale = keep.stale_files(carried, training_state)
        assert sorted(str(p.relative_to(carried)) for p in stale) == [
            "round0/model.safetensors", "round2/last.ckpt", "round2/wandb_run_id"]


def test_a_killed_loop_resumes_in_its_round_and_adds_no_queries(tiny_checkpoint, tmp_path,
                                                                 monkeypatch):
    cfg = active_config(tiny_checkpoint, tmp_path)
    real_fit = active_module.fit
    calls = []

    def dies_in_round_1(*args, **kwargs):
        calls.append(args[4])
        if "round 1" in args[4]:
            raise KeyboardInterrupt  # the kill, after round 1's ids were bought
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(active_module, "fit", dies_in_round_1)
    with pytest.raises(KeyboardInterrupt):
        active(cfg)
    assert len(purposes(tmp_path)) == 20  # round 0's ten and round 1's ten
    monkeypatch.setattr(active_module, "fit", lambda *a, **k: (calls.append(a[4]),
                                                               real_fit(*a, **k))[1])
    summary = active(cfg)
    assert [c.split()[-1] for c in calls] == ["0", "1", "1", "2"]  # round 0 was not redone
    assert len(purposes(tmp_path)) == 30
    assert [r["queries_per_seed"] for r in summary["rows"]] == [10, 20, 30]


@pytest.mark.slow
def test_test_labels_change_no_selection_and_no_prediction(tiny_checkpoint, tmp_path,
                                                            monkeypatch):
    from fewlabels.data import fashion_mnist

    real = fashion_mnist.load_test_set()
    permuted = type(real)(real.images, np.random.default_rng(0).permutation(real.labels))
    outcomes = []
    for tag, test_set in (("real-", real), ("permuted-", permuted)):
        monkeypatch.setattr(active_module, "load_test_set", lambda test_set=test_set: test_set)
        cfg = active_config(tiny_checkpoint, tmp_path, f"run_tag={tag}", "select=badge")
        active(cfg)
        folder = active_run(cfg, open_checkpoint(tiny_checkpoint), 0).folder
        rounds = [json.loads((folder / f"round{k}" / "round.json").read_text()) for k in range(3)]
        outcomes.append(([r["ids"] for r in rounds],
                         [np.load(folder / f"round{k}" / "test_predictions.npy") for k in range(3)],
                         [r["test_accuracy"] for r in rounds]))
    assert outcomes[0][0] == outcomes[1][0]
    for real_pred, permuted_pred in zip(outcomes[0][1], outcomes[1][1], strict=True):
        assert np.array_equal(real_pred, permuted_pred)
    assert outcomes[0][2] != outcomes[1][2]


@pytest.mark.parametrize("override, message", [
    ("budgets=[20,10]", "strictly increasing"), ("budgets=[]", "non-empty"),
    ("select=nope", "select='nope'"), ("strategy=nope", "strategy='nope'"),
    ("budgets=[10,5000]", "the pool has 2048 images"), ("round_fraction=0", "round_fraction"),
    ("target=2", "target=2"), ("last_round_fraction=0", "last_round_fraction"),
    ("last_round_fraction=abc", "a number above 0"),
    ("warm_start=false last_round_fraction=1.0", "warm-started last round"),
    ("branch_from=../x", "branch_from"),
    ("last_round_algorithm=nope", "last_round_algorithm='nope'.*selftrain"),
    ("budgets=[10] last_round_algorithm=selftrain", "last of two or more rounds"),
    ("last_round_unlabeled_ratio=0", "last_round_unlabeled_ratio=0: must be a whole number >= 1"),
    ("last_round_unlabeled_ratio=1.5", "last_round_unlabeled_ratio=1.5"),
    ("budgets=[10] last_round_unlabeled_ratio=3", "last of two or more rounds"),
    ("last_round_stream=0", "last_round_stream=0: must be a whole number >= 1"),
    ("last_round_stream=1001", "last_round_stream=1001.*from 1 to 1000"),
    ("budgets=[10] last_round_stream=1", "last of two or more rounds"),
    ("branch_from=no-such-run", "holds no finished round of seed 0"),
    ("replay_from=../x", "replay_from"),
    ("replay_from=no-such-run", "replay_from='no-such-run': .* holds no active run of seed 0"),
    ("trainer.max_time=90m", "trainer.max_time.*DD:HH:MM:SS"),
    ("algorithm=distill", "algorithm=distill: a fine-tuned model teaches itself"),
    ("last_round_algorithm=distill", "last_round_algorithm='distill'"),
    ("distill_fraction=0", "distill_fraction"),
    ("warm_start=false distill_fraction=1.0", "needs warm_start=true"),
])
def test_bad_arguments_fail_before_any_query(tiny_checkpoint, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        active(active_config(tiny_checkpoint, tmp_path, *override.split()))
    assert not (tmp_path / "ckpt").exists()
    assert not (tmp_path / "labels.sqlite").exists() or stats() == []


def test_a_time_capped_round_is_not_taken_for_done(tiny_checkpoint, tmp_path):
    capped = active_config(tiny_checkpoint, tmp_path, "trainer.steps=100000",
                           "trainer.max_time=00:00:00:01")
    assert active(capped) == {}  # no curve from an unfinished round
    folder = active_run(capped, open_checkpoint(tiny_checkpoint), 0).folder
    last = folder / "round0" / "last.ckpt"
    assert last.is_file()
    assert not (folder / "round0" / "round.json").exists()
    assert not list((tmp_path / "results").glob("active-*.csv"))
    step = torch.load(last, weights_only=True)["global_step"]
    assert active(capped) == {}  # the cap counts per invocation: the same command trains on
    assert torch.load(last, weights_only=True)["global_step"] > step


def test_warm_rounds_start_from_the_last_model_and_self_training_renews_its_teacher(
        tiny_checkpoint, tmp_path, monkeypatch):
    """The 2,500-label 90% (README, "Results") comes from self-training in the rounds: a warm
    round must begin with the last round's saved model, and its students must learn from a
    teacher taken from that model (not the fresh head the teacher is built with)."""
    cfg = active_config(tiny_checkpoint, tmp_path, "algorithm=selftrain", "trainer.steps=20")
    real_fit = active_module.fit
    seen = []

    def watching_fit(round_cfg, learner, folder, *args, **kwargs):
        start = {k: v.clone() for k, v in learner.model.state_dict().items()}
        fresh_teacher = learner.teacher.head.weight.detach().clone()
        result = real_fit(round_cfg, learner, folder, *args, **kwargs)
        seen.append((start, fresh_teacher, learner.teacher.head.weight.detach().clone()))
        return result

    monkeypatch.setattr(active_module, "fit", watching_fit)
    summary = active(cfg)
    assert [r["queries_per_seed"] for r in summary["rows"]] == [10, 20, 30]
    folder = active_run(cfg, open_checkpoint(tiny_checkpoint), 0).folder
    for k in (1, 2):
        previous = load_classifier(folder / f"round{k - 1}" / CLASSIFIER_FILE).state_dict()
        start, fresh_teacher, teacher = seen[k]
        assert all(torch.equal(start[name], value) for name, value in previous.items())
        assert not torch.equal(teacher, fresh_teacher)
    assert [json.loads((folder / f"round{k}" / "round.json").read_text())["steps"]
            for k in range(3)] == [20, 4, 4]


def finished_source_then_watch_fit(tiny_checkpoint, tmp_path, monkeypatch, watch):
    """A finished tiny run to branch from (W&B offline), then every round's ``fit`` first calls
    ``watch(round_cfg, learner)``; the checkpoint and the source run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    source_cfg = active_config(tiny_checkpoint, tmp_path)
    active(source_cfg)
    ckpt = open_checkpoint(tiny_checkpoint)
    real_fit = active_module.fit

    def watching_fit(round_cfg, learner, *args, **kwargs):
        watch(round_cfg, learner)
        return real_fit(round_cfg, learner, *args, **kwargs)

    monkeypatch.setattr(active_module, "fit", watching_fit)
    return ckpt, active_run(source_cfg, ckpt, 0)


def test_a_branch_copies_the_rounds_trained_alike_requeries_them_and_trains_the_rest(
        tiny_checkpoint, tmp_path, monkeypatch):
    """A longer last round branched from a finished run: rounds 0 and 1 are the source's (same
    ids, same model, same test predictions) yet bought again under the branch's own oracle run;
    only the last round trains, for last_round_fraction of the steps."""
    trained = []
    ckpt, source = finished_source_then_watch_fit(
        tiny_checkpoint, tmp_path, monkeypatch,
        lambda round_cfg, learner: trained.append(int(round_cfg.trainer.steps)))
    cfg = active_config(tiny_checkpoint, tmp_path, "last_round_fraction=0.5",
                        f"branch_from={source.name}")
    summary = active(cfg)
    branch = active_run(cfg, ckpt, 0)
    assert branch.name == source.name + "-last5" and trained == [5]
    assert {s.run_id: s.labels_revealed for s in stats()} == {source.oracle_run_id: 30,
                                                              branch.oracle_run_id: 30}
    for k in range(3):
        was, now = (json.loads((run.folder / f"round{k}" / "round.json").read_text())
                    for run in (source, branch))
        assert now["n_queries"] == was["n_queries"] == 10 * (k + 1)
        same_model = (run.folder / f"round{k}" / CLASSIFIER_FILE for run in (source, branch))
        if k < 2:
            assert now["ids"] == was["ids"] and now["copied_from"] == str(source.folder /
                                                                           f"round{k}")
            assert now["test_accuracy"] == was["test_accuracy"]
            assert len({p.read_bytes() for p in same_model}) == 1
        else:  # round 2 buys the same ids (round 1's model is the same) and trains longer
            assert now["ids"] == was["ids"] and "copied_from" not in now
            assert (was["steps"], now["steps"]) == (2, 5)
    assert [r["queries_per_seed"] for r in summary["rows"]] == [10, 20, 30]

    # A source trained otherwise is refused before anything is bought.
    with pytest.raises(ValueError, match="differs in .*ema_decay"):
        active(active_config(tiny_checkpoint, tmp_path, "last_round_fraction=0.5",
                             "ema_decay=0.5", f"branch_from={source.name}", "run_tag=other-"))
    (source.folder / "config.yaml").write_text("budgets: [10, 20\n")  # damaged: a clear error
    with pytest.raises(ValueError, match="config.yaml cannot be read"):
        active(active_config(tiny_checkpoint, tmp_path, "last_round_fraction=0.5",
                             f"branch_from={source.name}", "run_tag=third-"))
    assert len(stats()) == 2


def test_a_branch_with_another_acquisition_copies_round_0_only(tiny_checkpoint, tmp_path,
                                                               monkeypatch):
    """Round 0 picks with the cold start, so a branch that buys its later rounds with BADGE
    instead of margin copies the source's round 0 (bought again under its own oracle run) and
    trains every later round from there, buying BADGE's picks."""
    trained = []
    ckpt, source = finished_source_then_watch_fit(
        tiny_checkpoint, tmp_path, monkeypatch,
        lambda round_cfg, learner: trained.append(int(round_cfg.trainer.steps)))
    cfg = active_config(tiny_checkpoint, tmp_path, "select=badge", f"branch_from={source.name}")
    active(cfg)
    branch = active_run(cfg, ckpt, 0)
    assert "typiclust-badge" in branch.name and trained == [2, 2]
    assert {s.run_id: s.labels_revealed for s in stats()} == {source.oracle_run_id: 30,
                                                              branch.oracle_run_id: 30}
    was, now = ([json.loads((run.folder / f"round{k}" / "round.json").read_text())
                 for k in range(3)] for run in (source, branch))
    assert now[0]["copied_from"] == str(source.folder / "round0")
    assert now[0]["ids"] == was[0]["ids"]
    assert [r["how"] for r in now] == ["typiclust", "badge", "badge"]
    assert all("copied_from" not in r for r in now[1:])


def test_a_branch_from_a_carried_run_copies_records_and_continues_from_its_last_kept_model(
        tiny_checkpoint, tmp_path, monkeypatch, keep):
    """A source as ``make keep`` carries it (every round's records, the models of its last two
    finished rounds, no test predictions): a longer last round branches from it, copies rounds 0
    and 1 and starts round 2 from round 1's kept model (a seed the source did not run trains every
    round). With round 1's model gone too, only round
    0 could be continued: the branch copies it and trains rounds 1 and 2; with no model at all the
    branch is refused before anything is bought."""
    starts = []
    ckpt, source = finished_source_then_watch_fit(
        tiny_checkpoint, tmp_path, monkeypatch,
        lambda round_cfg, learner: starts.append(learner.model.head.weight.detach().clone()))
    kept = set(keep.files_to_keep(source.folder))
    assert {p.parent.name for p in kept if p.name == CLASSIFIER_FILE} == {"round1", "round2"}
    for path in source.folder.rglob("*"):
        if path.is_file() and path not in kept:
            path.unlink()

    def branch(tag: str, *extra: str):
        return active(active_config(tiny_checkpoint, tmp_path, "last_round_fraction=0.5",
                                    f"branch_from={source.name}", f"run_tag={tag}", *extra))

    def copied(tag: str, seed: int = 0) -> list[bool]:
        folder = next((tmp_path / "ckpt" / FINETUNED_DIR).glob(f"active-{tag}*-seed{seed}"))
        return ["copied_from" in json.loads((folder / f"round{k}" / "round.json").read_text())
                for k in range(3)]

    branch("a-", "seeds=2")
    assert copied("a-") == [True, True, False] and copied("a-", seed=1) == [False] * 3
    assert len(starts) == 4  # seed 0's round 2, seed 1's rounds 0 to 2
    starts[1:] = []
    round1 = load_classifier(source.folder / "round1" / CLASSIFIER_FILE).head.weight
    assert torch.equal(starts[0], round1)

    (source.folder / "round1" / CLASSIFIER_FILE).unlink()
    (source.folder / "round0" / CLASSIFIER_FILE).write_bytes(
        (source.folder / "round2" / CLASSIFIER_FILE).read_bytes())  # any model of this backbone
    branch("b-")
    assert copied("b-") == [True, False, False] and len(starts) == 3

    (source.folder / "round0" / CLASSIFIER_FILE).unlink()
    runs = len(stats())
    with pytest.raises(ValueError, match="no round this run would train alike whose"):
        branch("c-")
    assert len(stats()) == runs


def test_a_last_round_algorithm_trains_only_the_last_round_and_a_branch_does_not_copy_it(
        tiny_checkpoint, tmp_path, monkeypatch):
    """``last_round_algorithm=selftrain`` after supervised rounds: branched from a run trained
    with one algorithm throughout, its rounds 0 and 1 are copied, round 2 (bought alike) trains
    with self-training's own settings, and the run reads back under the same command."""
    learners = []
    _, source = finished_source_then_watch_fit(
        tiny_checkpoint, tmp_path, monkeypatch,
        lambda round_cfg, learner: learners.append((type(learner).__name__,
                                                    round_cfg.algorithm.name)))
    overrides = ("last_round_algorithm=selftrain", f"branch_from={source.name}")
    summary = active(active_config(tiny_checkpoint, tmp_path, *overrides))
    assert learners == [("SelfTrain", "selftrain")]
    assert summary["algorithm"] == "supervised" and summary["last_round_algorithm"] == "selftrain"
    branch = next(p for p in (tmp_path / "ckpt" / FINETUNED_DIR).iterdir()
                  if p.name != source.folder.name)
    assert branch.name == f"{source.name}-selftrain-seed0"
    rounds = [json.loads((branch / f"round{k}" / "round.json").read_text()) for k in range(3)]
    assert [r.get("copied_from") is not None for r in rounds] == [True, True, False]
    assert rounds[2]["algorithm"] == "selftrain" and rounds[2]["n_queries"] == 30
    assert weights_metadata(branch / "round2" / CLASSIFIER_FILE)["algorithm"] == "selftrain"
    saved = OmegaConf.load(branch / "config.yaml")
    assert saved.last_round_algorithm.name == "selftrain" and saved.algorithm.name == "supervised"
    # Read back without branch_from: nothing trains again, and the folder keeps the config of the
    # invocation that copied its rounds.
    again = active(active_config(tiny_checkpoint, tmp_path, "last_round_algorithm=selftrain"))
    assert again["rows"] == summary["rows"] and len(learners) == 1
    assert OmegaConf.load(branch / "config.yaml").branch_from == source.name


def test_a_last_round_unlabeled_ratio_trains_only_the_last_round_so_and_is_not_copied_otherwise(
        tiny_checkpoint, tmp_path, monkeypatch):
    """``last_round_unlabeled_ratio=5`` branched from a run whose every round drew the preset's 2
    unlabeled images per labeled one: rounds 0 and 1 are copied, round 2 (bought alike) trains
    drawing 5, and it records that; a branch from it without the override copies rounds 0 and 1
    but trains its own round 2 again."""
    ratios = []
    ckpt, source = finished_source_then_watch_fit(
        tiny_checkpoint, tmp_path, monkeypatch,
        lambda round_cfg, learner: ratios.append((int(round_cfg.batch.unlabeled_ratio),
                                                  learner.batches.unlabeled_ratio)))
    cfg = active_config(tiny_checkpoint, tmp_path, "last_round_unlabeled_ratio=5",
                        f"branch_from={source.name}")
    summary = active(cfg)
    branch = active_run(cfg, ckpt, 0)
    assert branch.name == source.name + "-mu5" and ratios == [(5, 5)]
    assert summary["last_round_unlabeled_ratio"] == 5
    rounds = [json.loads((branch.folder / f"round{k}" / "round.json").read_text())
              for k in range(3)]
    assert [r.get("copied_from") is not None for r in rounds] == [True, True, False]
    assert rounds[2]["unlabeled_ratio"] == 5 and rounds[2]["n_queries"] == 30
    assert rounds[2]["ids"][:20] == rounds[1]["ids"]
    # A branch of the -mu5 run that draws the preset's ratio in every round: round 2 trains.
    back = active_config(tiny_checkpoint, tmp_path, "run_tag=back-", f"branch_from={branch.name}")
    active(back)
    assert ratios == [(5, 5), (2, 2)]
    copied = [json.loads((active_run(back, ckpt, 0).folder / f"round{k}" / "round.json")
                         .read_text()).get("copied_from") is not None for k in range(3)]
    assert copied == [True, True, False]


def test_a_last_round_stream_retrains_the_last_round_alike_but_for_its_random_stream(
        tiny_checkpoint, tmp_path, monkeypatch):
    """``last_round_stream=1`` branched from a finished run: rounds 0 and 1 are copied, round 2
    buys the same ids and trains from the same model with the same settings, seeded from
    another stream, so its model differs from the source's; it records the stream, and a branch
    of it without the override trains its own round 2 again."""
    seeds = []
    ckpt, source = finished_source_then_watch_fit(
        tiny_checkpoint, tmp_path, monkeypatch,
        lambda round_cfg, learner: seeds.append((int(round_cfg.trainer.steps),
                                                 torch.initial_seed())))
    cfg = active_config(tiny_checkpoint, tmp_path, "last_round_stream=1",
                        f"branch_from={source.name}")
    summary = active(cfg)
    branch = active_run(cfg, ckpt, 0)
    assert branch.name == source.name + "-stream1" and summary["last_round_stream"] == 1
    steps = json.loads((source.folder / "round2" / "round.json").read_text())["steps"]
    assert seeds == [(steps, 2 + 1_000_000)]  # seed 0, round 2, stream 1
    mine, theirs = (json.loads((run / "round2" / "round.json").read_text())
                    for run in (branch.folder, source.folder))
    assert mine["stream"] == 1 and "copied_from" not in mine and theirs["stream"] == 0
    assert mine["ids"] == theirs["ids"] and mine["n_queries"] == theirs["n_queries"] == 30
    assert not torch.equal(load_classifier(branch.folder / "round2" / CLASSIFIER_FILE).head.weight,
                           load_classifier(source.folder / "round2" / CLASSIFIER_FILE).head.weight)
    back = active_config(tiny_checkpoint, tmp_path, "run_tag=back-", f"branch_from={branch.name}")
    active(back)
    assert seeds[1:] == [(steps, 2)]
    copied = [json.loads((active_run(back, ckpt, 0).folder / f"round{k}" / "round.json")
                         .read_text()).get("copied_from") is not None for k in range(3)]
    assert copied == [True, True, False]


def test_a_distillation_round_buys_nothing_and_teaches_the_last_model_to_itself(
        tiny_checkpoint, tmp_path, monkeypatch):
    """``distill_fraction=0.5`` branched from a finished run: its rounds 0 to 2 are copied and one
    more round trains a student for half the steps, starting from round 2's model, whose frozen
    teacher is that model; it buys no label, its row repeats the last budget's queries, and the
    same command reads it back."""
    seen = []
    _, source = finished_source_then_watch_fit(
        tiny_checkpoint, tmp_path, monkeypatch,
        lambda round_cfg, learner: seen.append((round_cfg.algorithm.name,
                                                int(round_cfg.trainer.steps), learner)))
    overrides = ("distill_fraction=0.5", f"branch_from={source.name}")
    summary = active(active_config(tiny_checkpoint, tmp_path, *overrides))
    assert [(name, steps) for name, steps, _ in seen] == [("distill", 5)]
    assert [r["queries_per_seed"] for r in summary["rows"]] == [10, 20, 30, 30]
    assert summary["distill_steps"] == 5
    branch = next(p for p in (tmp_path / "ckpt" / FINETUNED_DIR).iterdir()
                  if p.name != source.folder.name)
    assert branch.name == f"{source.name}-distill5-seed0"
    result = json.loads((branch / "round3" / "round.json").read_text())
    assert (result["how"], result["new_ids"], result["algorithm"]) == ("distill", 0, "distill")
    assert {s.run_id: s.labels_revealed for s in stats()}[result["oracle_run_id"]] == 30
    teacher = dict(seen[0][2].teacher.named_parameters())
    round2 = load_classifier(source.folder / "round2" / CLASSIFIER_FILE)
    assert all(torch.equal(teacher[name], value) for name, value in round2.named_parameters())
    student = load_classifier(branch / "round3" / CLASSIFIER_FILE)
    assert not torch.equal(student.head.weight, round2.head.weight)
    assert active(active_config(tiny_checkpoint, tmp_path, *overrides))["rows"] == summary["rows"]
    assert len(seen) == 1  # read back, nothing trained again


def test_a_replay_buys_each_round_the_ids_its_source_bought_and_scores_nothing(
        tiny_checkpoint, tmp_path, monkeypatch):
    """``replay_from`` a finished run: every round, round 0 included, buys the ids the source's
    same round bought, under the replay's own oracle run, without the cold start's features, a
    pool score or a selection; it trains its own models (here with twice the warm steps), and
    both runs together were revealed the same 30 distinct ids, which is what an ensemble of the
    two counts. A source with other budgets or without this seed is refused before any query."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    source_cfg = active_config(tiny_checkpoint, tmp_path)
    active(source_cfg)
    ckpt = open_checkpoint(tiny_checkpoint)
    source = active_run(source_cfg, ckpt, 0)
    for name in ("features", "score_pool", "select"):
        monkeypatch.setattr(active_module, name, lambda *a, n=name, **k: pytest.fail(n))
    cfg = active_config(tiny_checkpoint, tmp_path, "round_fraction=0.4",
                        f"replay_from={source.name}")
    summary = active(cfg)
    replay = active_run(cfg, ckpt, 0)
    assert f"-supervised-{replay_tag(source.name)}-b10-20-30" in replay.name
    assert summary["replay_from"] == source.name
    assert {s.run_id: s.labels_revealed for s in stats()} == {source.oracle_run_id: 30,
                                                              replay.oracle_run_id: 30}
    assert distinct_ids_revealed([source.oracle_run_id, replay.oracle_run_id]) == 30
    was, now = ([json.loads((run.folder / f"round{k}" / "round.json").read_text())
                 for k in range(3)] for run in (source, replay))
    assert [r["ids"] for r in now] == [r["ids"] for r in was]
    assert [r["how"] for r in now] == ["replay"] * 3
    assert [r["steps"] for r in now] == [10, 4, 4] and [r["steps"] for r in was] == [10, 2, 2]
    for k in range(3):
        selection = json.loads((replay.folder / f"round{k}" / "selection.json").read_text())
        assert selection["replayed_from"] == str(source.folder / f"round{k}")
    assert not torch.equal(load_classifier(replay.folder / "round2" / CLASSIFIER_FILE).head.weight,
                           load_classifier(source.folder / "round2" / CLASSIFIER_FILE).head.weight)

    def refused(*overrides: str) -> str:
        with pytest.raises(ValueError) as err:
            active(active_config(tiny_checkpoint, tmp_path, f"replay_from={source.name}",
                                 "run_tag=other-", *overrides))
        return str(err.value)

    assert "bought budgets=[10, 20, 30]" in refused("budgets=[10,25,30]")
    assert "holds no active run of seed 1" in refused("seeds=2")
    selection = source.folder / "round1" / "selection.json"  # a source edited by hand
    edited = json.loads(selection.read_text())
    selection.write_text(json.dumps({**edited, "new_ids": edited["new_ids"][::-1]}))
    assert "round1: its selection.json and round.json disagree" in refused()
    assert len(stats()) == 2
