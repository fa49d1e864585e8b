"""Fine-tuning: tiny real runs (the tiny pretrained checkpoint, a 2,048-image pool, tens of
steps), the FixMatch and self-training steps, resume after a kill, and the honesty checks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from fewlabels.config import ConfigError, compose
from fewlabels.data import load_train_images
from fewlabels.data.transforms import StrongView, WeakView
from fewlabels.models import (
    BACKBONE_FILE,
    CLASSIFIER_FILE,
    Classifier,
    NarrowResNet,
    load_classifier,
    newest_checkpoint,
    open_checkpoint,
    save_weights,
)
from fewlabels.models.checkpoint import CONFIG_FILE, KIND_CLASSIFIER
from fewlabels.oracle import stats
from fewlabels.semisup import FixMatch, SelfTrain
from fewlabels.semisup.base import BatchSettings, OptimizerSettings, ema_decay_at
from fewlabels.semisup.fixmatch import FixMatchSettings
from fewlabels.semisup.run import (
    PREDICTIONS_FILE,
    SELECTION_FILE,
    check_same_training,
    finetune,
    seed_run,
)
from fewlabels.semisup.selftrain import SelfTrainSettings
from fewlabels.semisup.simmatch import SimMatch, SimMatchSettings
from fewlabels.semisup.softmatch import SoftMatch, SoftMatchSettings
from fewlabels.tracking import read_offline_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "finetune"


def finetune_config(ckpt: Path, tmp: Path, *overrides: str):
    return compose("finetune", ["preset=tiny", f"checkpoint={ckpt}",
                                f"checkpoint_dir={tmp / 'ckpt'}", f"results_dir={tmp / 'results'}",
                                f"logger.dir={tmp}", *overrides])


def finetune_command(ckpt: Path, tmp: Path, *overrides: str,
                     algorithm: str = "fixmatch") -> list[str]:
    """``fewlabels finetune`` of one tiny seed (FixMatch unless told) on 20 labels, checkpointed
    every 5 steps, as a child process runs it (to be killed)."""
    return [str(Path(sys.executable).parent / "fewlabels"), "finetune", "preset=tiny",
            f"checkpoint={ckpt}", f"checkpoint_dir={tmp / 'ckpt'}",
            f"results_dir={tmp / 'results'}", f"logger.dir={tmp}", "n=20", "seeds=1",
            f"algorithm={algorithm}", "trainer.steps_per_epoch=5", *overrides]


def tiny_learner(cls, steps: int = 10, **kwargs):
    images = torch.from_numpy(load_train_images().images[:256])
    labels = torch.arange(32) % 10
    model = Classifier(NarrowResNet([8, 8, 16, 16], [1, 1, 1, 1]), 10)
    return cls(model, images[:32], labels, images, BatchSettings(8, 2, 0, False),
               OptimizerSettings(0.03, 0.9, True, 5e-4, 1, steps), 0.999, WeakView(),
               StrongView(), **kwargs)


def views(learner, step: int = 0):
    idx_lb, y_lb, idx_ulb = learner._draw(step)
    assert idx_ulb is not None
    learner.lb_idx, learner.ulb_idx = idx_lb, idx_ulb  # as training_step sets them
    unlabeled = learner.pool_images[idx_ulb]
    return (learner.weak(learner.labeled_images[idx_lb]), y_lb, learner.weak(unlabeled),
            learner.strong(unlabeled))


def test_fixmatch_step_is_finite_masks_by_threshold_and_moves_the_ema():
    torch.manual_seed(0)
    strict = tiny_learner(FixMatch, settings=FixMatchSettings(1.0, 1.0, "online"))
    loss, logs = strict.train_step(*views(strict))
    assert torch.isfinite(loss)
    assert logs["train/loss_ulb"].item() == 0.0 and logs["train/mask_rate"].item() == 0.0
    assert torch.allclose(loss, logs["train/loss_lb"])

    lax = tiny_learner(FixMatch, settings=FixMatchSettings(0.0, 1.0, "ema"))
    loss, logs = lax.train_step(*views(lax))
    assert logs["train/mask_rate"].item() == 1.0 and logs["train/loss_ulb"].item() > 0
    share = torch.stack([logs[f"pseudo/class_{c}"] for c in range(10)])
    assert share.sum().item() == pytest.approx(1.0)

    before = [p.detach().clone() for p in lax.ema_model.parameters()]
    optimizer = torch.optim.SGD(lax.model.parameters(), lr=0.1)
    loss.backward()
    optimizer.step()
    lax._update_ema()
    moved = [not torch.equal(a, b) for a, b in zip(before, lax.ema_model.parameters(),
                                                    strict=True)]
    differs = [not torch.equal(a, b) for a, b in zip(lax.model.parameters(),
                                                     lax.ema_model.parameters(), strict=True)]
    assert any(moved) and any(differs)
    for ema_buf, buf in zip(lax.ema_model.buffers(), lax.model.buffers(), strict=True):
        assert torch.equal(ema_buf, buf)  # BatchNorm statistics follow the online model
    assert ema_decay_at(0, 0.999) == 0.1 and ema_decay_at(10**6, 0.999) == 0.999


def test_selftrain_phases_and_teacher_handover():
    learner = tiny_learner(SelfTrain, steps=10, settings=SelfTrainSettings(0.3, 2, 1.0, 1.0))
    assert learner.generation_starts == [3, 7]
    assert not learner.needs_unlabeled(2) and learner.needs_unlabeled(3)
    assert learner._draw(0)[2] is None  # no unlabeled image drawn for the first teacher
    x_lb, y_lb, weak, strong = views(learner, step=5)
    loss, logs = learner.train_step(x_lb, y_lb, None, None)  # the first teacher: labels only
    assert torch.isfinite(loss) and "train/loss_ulb" not in logs
    loss, logs = learner.train_step(x_lb, y_lb, weak, strong)
    assert torch.isfinite(loss) and logs["train/loss_ulb"].item() >= 0
    with torch.no_grad():
        next(learner.ema_model.parameters()).add_(1.0)
    learner._trainer = type("T", (), {"global_step": 3})()  # what Lightning provides
    learner.on_train_batch_start(None, 0)
    assert torch.equal(next(learner.teacher.parameters()), next(learner.ema_model.parameters()))


def test_views_keep_shape_and_differ():
    images = torch.from_numpy(load_train_images().images[:64])
    weak, strong = WeakView()(images), StrongView()(images)
    assert weak.shape == strong.shape == (64, 1, 28, 28)
    assert weak.dtype == strong.dtype == torch.float32
    assert not torch.allclose(weak, strong)
    assert torch.isfinite(strong).all()


@pytest.mark.slow
def test_finetune_counts_queries_learns_and_logs(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = finetune_config(tiny_checkpoint, tmp_path, "n=20", "seeds=1", "algorithm=fixmatch")
    (result,) = finetune(cfg)
    run = seed_run(cfg, open_checkpoint(tiny_checkpoint), 0)
    revealed = {s.run_id: s.labels_revealed for s in stats()}
    assert revealed == {run.oracle_run_id: 20}
    assert result["n_queries"] == 20 and result["steps"] == cfg.trainer.steps
    assert result["ended_by"] == "steps"
    assert result["train_accuracy_on_queried"] > 0.3  # chance is 0.1
    assert result["test_accuracy"] > 0.2
    saved = json.loads(run.result_file.read_text())
    assert saved["test_accuracy"] == result["test_accuracy"]
    assert len(saved["per_class_accuracy"]) == 10 and len(saved["confusion_matrix"]) == 10
    model = load_classifier(run.folder / CLASSIFIER_FILE)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)

    logged = read_offline_run(next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")))
    keys = {k for row in logged["history"] for k in row}
    assert {"train/loss", "train/mask_rate", "pseudo/class_0", "lr-SGD/pg1"} <= keys
    assert logged["summary"]["n_queries"] == 20
    assert logged["summary"]["test_accuracy"] == pytest.approx(result["test_accuracy"])

    # Again: read back, nothing trained or revealed.
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (again,) = finetune(cfg)
    assert again == saved
    assert {s.run_id: s.labels_revealed for s in stats()} == revealed
    # A fine-tuned classifier is never taken for the newest pretrained backbone: this folder
    # holds only fine-tuned output.
    assert (tmp_path / "ckpt" / "finetuned").is_dir()
    with pytest.raises(ValueError, match="no checkpoint"):
        newest_checkpoint(tmp_path / "ckpt")


def test_newest_checkpoint_skips_classifiers(tiny_checkpoint, tmp_path):
    import shutil

    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt_dir / "pretrained")
    time.sleep(0.01)
    impostor = ckpt_dir / "impostor"
    impostor.mkdir()
    model = Classifier(NarrowResNet([8, 8, 16, 16], [1, 1, 1, 1]), 10)
    save_weights(model, impostor / BACKBONE_FILE, KIND_CLASSIFIER, {"name": "narrow_resnet"},
                 16, num_classes="10")
    (impostor / "config.yaml").write_text("{}")
    assert newest_checkpoint(ckpt_dir) == ckpt_dir / "pretrained"
    with pytest.raises(ValueError, match="not a pretrained backbone"):
        open_checkpoint(impostor)


@pytest.mark.slow
def test_test_labels_change_no_selection_and_no_prediction(tiny_checkpoint, tmp_path,
                                                            monkeypatch):
    """The whole command, run with the real test labels and with permuted ones: the same ids are
    queried and the same predictions made; only the reported accuracy differs."""
    from fewlabels.data import fashion_mnist
    from fewlabels.semisup import run as run_module

    real = fashion_mnist.load_test_set()
    permuted = type(real)(real.images, np.random.default_rng(0).permutation(real.labels))
    outcomes = []
    for tag, test_set in (("real-", real), ("permuted-", permuted)):
        monkeypatch.setattr(run_module, "load_test_set", lambda test_set=test_set: test_set)
        cfg = finetune_config(tiny_checkpoint, tmp_path, "n=20", "seeds=1",
                              "algorithm=supervised", f"run_tag={tag}", "trainer.steps=10")
        (result,) = finetune(cfg)
        folder = seed_run(cfg, open_checkpoint(tiny_checkpoint), 0).folder
        outcomes.append((json.loads((folder / SELECTION_FILE).read_text())["ids"],
                         np.load(folder / PREDICTIONS_FILE), result["test_accuracy"]))
    assert outcomes[0][0] == outcomes[1][0]
    assert np.array_equal(outcomes[0][1], outcomes[1][1])
    assert outcomes[0][2] != outcomes[1][2]


@pytest.mark.parametrize("override, message", [
    ("n=0", "n=0"), ("seeds=0", "seeds=0"), ("strategy=nope", "strategy='nope'"),
    ("n=5000", "the pool has 2048 images"), ("trainer.steps=0", "trainer.steps=0"),
])
def test_bad_arguments_fail_before_any_query(tiny_checkpoint, tmp_path, override, message):
    cfg = finetune_config(tiny_checkpoint, tmp_path, override)
    with pytest.raises(ValueError, match=message):
        finetune(cfg)
    assert not (tmp_path / "ckpt").exists()
    db = Path(tmp_path / "labels.sqlite")
    assert not db.exists() or stats() == []


def test_unknown_algorithm_is_a_config_error(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="algorithm"):
        finetune_config(tiny_checkpoint, tmp_path, "algorithm=nope")


@pytest.mark.slow
def test_killed_run_resumes_and_adds_no_queries(tiny_checkpoint, tmp_path, subprocess_env):
    args = finetune_command(tiny_checkpoint, tmp_path, "trainer.steps=400")
    env = subprocess_env(WANDB_MODE="disabled")
    proc = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    folder = None
    deadline = time.time() + 300
    while time.time() < deadline:
        found = list((tmp_path / "ckpt" / "finetuned").glob("*/last.ckpt"))
        if found:
            folder = found[0].parent
            break
        time.sleep(0.2)
    time.sleep(1.0)
    proc.kill()
    proc.wait()
    assert folder is not None and not (folder / CLASSIFIER_FILE).exists()
    saved = torch.load(folder / "last.ckpt", weights_only=False, map_location="cpu")
    saved_step, saved_seconds = saved["global_step"], saved["callbacks"]["TrainingClock"]["seconds"]
    assert 0 < saved_step < 400 and saved_seconds > 0
    before = {s.run_id: s.labels_revealed for s in stats()}
    assert list(before.values()) == [20]
    first_config = (folder / CONFIG_FILE).read_text()

    # Resumed with a setting that does not change training: the folder keeps the config of the
    # invocation that made it.
    done = subprocess.run([*args, "trainer.eval_batch_size=333"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next((tmp_path / "results").glob("finetune-*.json")).read_text())
    assert result["resumed_from_step"] == saved_step  # trained only the remaining steps
    assert result["steps"] == 400
    # The wall time adds the killed invocation's time up to its checkpoint to this one's.
    assert result["wall_time_s_this_invocation"] > 0
    assert result["wall_time_s"] == pytest.approx(
        saved_seconds + result["wall_time_s_this_invocation"], abs=0.11)  # both rounded to 0.1
    assert {s.run_id: s.labels_revealed for s in stats()} == before
    assert (folder / CONFIG_FILE).read_text() == first_config and "333" not in first_config


def test_flexmatch_thresholds_follow_the_curriculum():
    from fewlabels.semisup import FlexMatch

    learner = tiny_learner(FlexMatch, settings=FixMatchSettings(0.95, 1.0, "ema"))
    assert torch.equal(learner.class_thresholds(), torch.zeros(10))  # warm-up: nothing learned
    learner.selected_label[:150] = 0
    learner.selected_label[150:200] = 1
    t = learner.class_thresholds()
    assert t[0].item() == pytest.approx(0.95) and 0 < t[1].item() < t[0].item()
    assert t[2].item() == 0.0
    learner.ulb_idx = torch.tensor([200, 201, 202])
    mask = learner.pseudo_label_mask(torch.tensor([0.99, 0.5, 0.97]), torch.tensor([2, 3, 0]))
    assert mask.tolist() == [True, True, True]  # class 2 and 3 thresholds are 0, class 0's 0.95
    assert learner.selected_label[200:203].tolist() == [2, -1, 0]  # only confident ones count
    loss, logs = learner.train_step(*views(learner))
    assert torch.isfinite(loss) and "threshold/class_0" in logs


def test_softmatch_aligns_to_uniform_and_weights_by_a_truncated_gaussian():
    # momentum 0: the running estimates are this batch's, so the numbers can be checked by hand.
    learner = tiny_learner(SoftMatch, settings=SoftMatchSettings(1.0, "ema", 2.0, 0.0, True))
    probs = torch.full((4, 10), 0.01)
    probs[:3, 0] = 0.91
    probs[3] = 0.1 / 8
    probs[3, 0], probs[3, 6] = 0.5, 0.4  # class 6 second, and the batch hardly predicts it
    aligned = learner.probs_for_weights(probs)
    assert torch.allclose(learner.class_distribution.value, probs.mean(0))
    assert torch.allclose(aligned.sum(1), torch.ones(4))
    assert aligned.argmax(1).tolist() == [0, 0, 0, 6]  # the rare class gains ground
    assert aligned[0].max() < probs[0].max()  # the over-predicted class loses confidence
    assert aligned.mean(0).max() < probs.mean(0).max()  # nearer a uniform class distribution

    confidence = torch.tensor([0.9, 0.8, 0.5, 0.2])
    weight = learner.pseudo_label_mask(confidence, torch.zeros(4, dtype=torch.long))
    assert learner.confidence_mean.value.item() == pytest.approx(0.6)
    assert learner.confidence_var.value.item() == pytest.approx(confidence.var().item())
    assert weight[:2].tolist() == [1.0, 1.0]  # at or above the mean confidence: full weight
    assert 0 < weight[3] < weight[2] < 1  # below it: less, the further below
    width_sq = confidence.var() / 2.0 ** 2
    assert weight[3].item() == pytest.approx(torch.exp(-(0.4 ** 2) / (2 * width_sq)).item())

    plain = tiny_learner(SoftMatch, settings=SoftMatchSettings(1.0, "ema", 2.0, 0.999, False))
    assert torch.equal(plain.probs_for_weights(probs), probs)  # uniform alignment switched off
    # The pseudo-labels are the teacher's own argmax, aligned or not: with the same teacher and
    # views, an aligning learner's pseudo-labels equal a plain one's.
    aligning = tiny_learner(SoftMatch, settings=SoftMatchSettings(1.0, "ema", 2.0, 0.0, True))
    aligning.model.load_state_dict(plain.model.state_dict())
    aligning.ema_model.load_state_dict(plain.ema_model.state_dict())
    batch = views(plain)
    shares = []
    for learner_ in (plain, aligning):
        torch.manual_seed(0)
        shares.append(learner_.train_step(*batch)[1])
    logs = shares[0]
    for c in range(10):  # every weight is > 0, so the shares are those of all the pseudo-labels
        assert shares[0][f"pseudo/class_{c}"] == pytest.approx(shares[1][f"pseudo/class_{c}"])
    loss = plain.train_step(*batch)[0]
    assert torch.isfinite(loss) and logs["train/loss_ulb"].item() > 0
    assert 0 < logs["train/mask_rate"].item() <= 1  # the mean weight
    assert 0 < logs["softmatch/confidence_mean"].item() <= 1
    # The running estimates are state: a resumed run continues with them.
    assert {"class_distribution.total", "confidence_mean.weight", "confidence_var.total"} <= \
        set(plain.state_dict())
    with pytest.raises(ValueError, match="n_sigma"):
        tiny_learner(SoftMatch, settings=SoftMatchSettings(1.0, "ema", 0.0, 0.999, True))


def simmatch_settings(**changes):
    values = {"threshold": 0.95, "lambda_u": 1.0, "pseudo_label_model": "ema", "lambda_in": 1.0,
              "temperature": 0.1, "smoothing_alpha": 0.9, "projection_dim": 16, **changes}
    return SimMatchSettings(**values)


def test_simmatch_without_its_bank_is_flexmatch():
    from fewlabels.semisup import FlexMatch

    torch.manual_seed(0)
    sim = tiny_learner(SimMatch, settings=simmatch_settings(lambda_in=0.0, smoothing_alpha=1.0))
    flex = tiny_learner(FlexMatch, settings=FixMatchSettings(0.95, 1.0, "ema"))
    flex.model.load_state_dict(sim.model.state_dict())
    flex.ema_model.load_state_dict(sim.ema_model.state_dict())
    batch = views(sim)
    flex.lb_idx, flex.ulb_idx = sim.lb_idx, sim.ulb_idx
    sim_loss, sim_logs = sim.train_step(*batch)
    flex_loss, flex_logs = flex.train_step(*batch)
    assert sim_loss.item() == pytest.approx(flex_loss.item(), rel=1e-5)
    assert torch.equal(sim.selected_label, flex.selected_label)
    assert sim_logs["train/mask_rate"] == flex_logs["train/mask_rate"]


def test_simmatch_propagates_the_queried_labels_through_its_bank():
    torch.manual_seed(0)
    learner = tiny_learner(SimMatch, settings=simmatch_settings(threshold=0.0, temperature=0.01,
                                                               smoothing_alpha=0.5))
    x_lb, y_lb, weak, strong = views(learner)
    # Every queried image's vector points at its class; every weak view's at class 6. The
    # classifier prefers class 0 for all of them, but by a little.
    dim = learner.settings.projection_dim
    learner.bank.copy_(torch.eye(dim)[learner.labels])
    assert learner.bank_filled  # so the step does not fill it again
    probs = torch.full((len(weak), 10), 0.8 / 9)
    probs[:, 0] = 0.2
    towards_6 = torch.eye(dim)[torch.full((len(weak),), 6)]
    learner.teacher_outputs = lambda x: (probs[:len(x)], towards_6[:len(x)])
    loss, logs = learner.train_step(x_lb, y_lb, weak, strong)
    # Aggregation: the similarities all fall on class-6 images, so half the pseudo-label's
    # probability is class 6's and it wins over the classifier's mild preference for class 0.
    assert logs["pseudo/class_6"].item() == 1.0 and logs["train/mask_rate"].item() == 1.0
    assert torch.isfinite(loss) and logs["train/loss_in"].item() > 0
    # The bank's rows of this step's labeled images now hold the EMA model's vectors of them.
    assert torch.equal(learner.bank[learner.lb_idx], towards_6[:len(learner.lb_idx)])
    untouched = torch.ones(len(learner.labels), dtype=torch.bool)
    untouched[learner.lb_idx] = False
    assert torch.equal(learner.bank[untouched], torch.eye(dim)[learner.labels[untouched]])

    # The instance term trains the projection head; the EMA one follows it; both are state.
    loss.backward()
    assert all(p.grad is not None for p in learner.projector.parameters())
    before = [p.detach().clone() for p in learner.ema_projector.parameters()]
    torch.optim.SGD(learner.projector.parameters(), lr=0.1).step()
    learner._update_ema()
    assert any(not torch.equal(a, b) for a, b in zip(before, learner.ema_projector.parameters(),
                                                     strict=True))
    trained = {id(p) for group in learner.configure_optimizers()["optimizer"].param_groups
               for p in group["params"]}
    assert {id(p) for p in learner.projector.parameters()} <= trained
    assert {"bank", "projector.0.weight", "ema_projector.2.bias"} <= \
        set(learner.state_dict())
    with pytest.raises(ValueError, match="use 'ema'"):
        tiny_learner(SimMatch, settings=simmatch_settings(pseudo_label_model="online"))


def test_simmatch_fills_its_bank_once_with_unit_vectors():
    learner = tiny_learner(SimMatch, settings=simmatch_settings())
    assert not learner.bank_filled
    learner.train_step(*views(learner))
    assert learner.bank_filled
    assert torch.allclose(learner.bank.norm(dim=1), torch.ones(len(learner.labels)))
    filled = learner.bank.clone()
    learner.train_step(*views(learner, step=1))  # not filled again: only the batch's rows change
    changed = (learner.bank != filled).any(dim=1)
    assert changed.any() and set(changed.nonzero().flatten().tolist()) <= \
        set(learner.lb_idx.tolist())


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONFIGS / "algorithm").glob("*.yaml")))
def test_every_algorithm_config_builds_its_learner_and_steps(name, tmp_path):
    from fewlabels.semisup import ALGORITHMS
    from fewlabels.semisup.run import build_learner

    cfg = compose("finetune", ["preset=tiny", f"algorithm={name}", "trainer.channels_last=false",
                               f"checkpoint_dir={tmp_path}"])
    images = load_train_images().images[:64]
    learner = build_learner(cfg, NarrowResNet([8, 8, 16, 16], [1, 1, 1, 1]), images[:16],
                            np.arange(16) % 10, images, seed=0)
    assert type(learner) is ALGORITHMS[name][0]
    step = learner.optim.total_steps - 1  # past any labels-only phase
    idx_lb, y_lb, idx_ulb = learner._draw(step)
    learner.lb_idx, learner.ulb_idx = idx_lb, idx_ulb
    unlabeled = None if idx_ulb is None else learner.pool_images[idx_ulb]
    loss, _ = learner.train_step(
        learner.weak(learner.labeled_images[idx_lb]), y_lb,
        None if unlabeled is None else learner.weak(unlabeled),
        None if unlabeled is None else learner.strong(unlabeled))
    assert torch.isfinite(loss)


def test_running_mean_is_bias_corrected():
    from fewlabels.semisup.softmatch import RunningMean

    running = RunningMean((), momentum=0.999)
    assert running.update(torch.tensor(5.0)).item() == pytest.approx(5.0)  # no pull toward 0
    # Two values: the older weighs `momentum` against the newer's 1.
    assert running.update(torch.tensor(7.0)).item() == pytest.approx((0.999 * 5 + 7) / 1.999)
    assert RunningMean((3,), momentum=0.0).update(torch.tensor([1.0, 2, 3])).tolist() == [1, 2, 3]


NO_TRAIN_LABEL_FILE = """
import os, sys
def guard(event, args):
    name = os.path.basename(str(args[0])) if event == "open" and args else ""
    if "train-labels" in name:
        print("OPENED", args[0], flush=True)
        os._exit(99)
sys.addaudithook(guard)
from fewlabels.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_finetuning_reads_training_labels_only_through_the_database(tiny_checkpoint, tmp_path,
                                                                    subprocess_env):
    from fewlabels.oracle import ensure_database

    ensure_database()  # built beforehand: from here on, labels come from its queries alone
    proc = subprocess.run(
        [sys.executable, "-c", NO_TRAIN_LABEL_FILE, "finetune", "preset=tiny", "n=20", "seeds=1",
         "trainer.steps=5", f"checkpoint={tiny_checkpoint}", f"checkpoint_dir={tmp_path / 'c'}",
         f"results_dir={tmp_path / 'r'}", f"logger.dir={tmp_path}"],
        env=subprocess_env(WANDB_MODE="disabled"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "OPENED" not in proc.stdout
    assert len(list((tmp_path / "r").glob("finetune-*.json"))) == 1


def test_a_run_trained_in_another_precision_names_both_and_the_override_that_continues_it(
        tmp_path):
    trained = finetune_config(tmp_path, tmp_path, "trainer.precision=bf16-mixed")
    (tmp_path / CONFIG_FILE).write_text(OmegaConf.to_yaml(trained, resolve=True))
    check_same_training(finetune_config(tmp_path, tmp_path, "trainer.precision=bf16-mixed"),
                        tmp_path)  # the same settings: continued
    here = finetune_config(tmp_path, tmp_path, "trainer.precision=32-true")
    with pytest.raises(ValueError) as refused:
        check_same_training(here, tmp_path)
    message = str(refused.value)
    assert "trainer.precision: 'bf16-mixed' there, '32-true' now" in message
    assert "pass trainer.precision=bf16-mixed" in message and "run_tag=" in message


def test_a_changed_configuration_is_not_read_back_as_the_old_result(tiny_checkpoint, tmp_path):
    cfg = finetune_config(tiny_checkpoint, tmp_path, "n=20", "seeds=1", "algorithm=supervised",
                          "trainer.steps=5")
    finetune(cfg)
    changed = finetune_config(tiny_checkpoint, tmp_path, "n=20", "seeds=1",
                              "algorithm=supervised", "trainer.steps=5", "optimizer.lr=0.1")
    with pytest.raises(ValueError, match="another configuration.*optimizer.*run_tag"):
        finetune(changed)
    tagged = finetune_config(tiny_checkpoint, tmp_path, "n=20", "seeds=1", "run_tag=lr01-",
                             "algorithm=supervised", "trainer.steps=5", "optimizer.lr=0.1")
    (result,) = finetune(tagged)
    assert result["steps"] == 5


def test_a_finished_seed_is_read_back_only_where_its_labels_are_on_record(tiny_checkpoint,
                                                                           tmp_path, monkeypatch):
    from fewlabels.oracle import LabelDatabaseError

    cfg = finetune_config(tiny_checkpoint, tmp_path, "n=20", "seeds=1", "algorithm=supervised",
                          "trainer.steps=5")
    (result,) = finetune(cfg)
    monkeypatch.setenv("FEWLABELS_LABEL_DB", f"sqlite:///{tmp_path / 'elsewhere.sqlite'}")
    with pytest.raises(LabelDatabaseError, match=r"finetune-.*json.*20 labels.*has 0.*import"):
        finetune(cfg)


def test_report_never_averages_different_configurations(tmp_path, capsys):
    from fewlabels.semisup.report import report

    def result(tag: str, seed: int, steps: int, acc: float) -> None:
        (tmp_path / f"finetune-{tag}{seed}-{steps}.json").write_text(json.dumps({
            "oracle_run_id": f"finetune/{tag}ck-12345678/typiclust/n50/seed{seed}",
            "algorithm": "selftrain", "strategy": "typiclust", "n": 50, "seed": seed,
            "test_accuracy": acc, "n_queries": 50, "steps": steps, "steps_configured": steps,
            "ended_by": "steps", "wall_time_s_this_invocation": 60.0}))

    result("", 0, 100, 0.80)
    result("", 1, 100, 0.82)
    result("long-", 0, 200, 0.90)
    lines = report(tmp_path).splitlines()[2:]
    assert len(lines) == 2
    assert "| ck-12345678 | selftrain | typiclust | 50 | 81.00% ± 1.41% | 2 | 100 | 100 |" \
        in lines[0]
    assert "| long-ck-12345678 | selftrain | typiclust | 50 | 90.00% ± 0.00% | 1 | 50 | 200 |" \
        in lines[1]


def test_report_wall_time_counts_every_invocation_of_a_resumed_run(tmp_path):
    """A resumed run's ``wall_time_s`` (all invocations) is its wall time; a file written before
    that field existed falls back to ``wall_time_s_this_invocation``."""
    from fewlabels.semisup.report import rows

    for seed, times in ((0, {"wall_time_s": 600.0, "wall_time_s_this_invocation": 60.0}),
                        (1, {"wall_time_s_this_invocation": 60.0})):
        (tmp_path / f"finetune-{seed}.json").write_text(json.dumps({
            "oracle_run_id": f"finetune/ck-12345678/typiclust/n50/seed{seed}",
            "algorithm": "fixmatch", "strategy": "typiclust", "n": 50, "seed": seed,
            "test_accuracy": 0.8, "n_queries": 50, "steps": 100, "steps_configured": 100,
            "ended_by": "steps", **times}))
    (row,) = rows(tmp_path)
    assert row["wall_min"] == pytest.approx((600 + 60) / 2 / 60)


# SimMatch too: its bank, its projection heads and FlexMatch's curriculum are state to carry.
@pytest.mark.parametrize("algorithm", ["fixmatch", "simmatch"])
def test_a_killed_and_resumed_run_ends_with_the_model_of_one_never_stopped(tiny_checkpoint,
                                                                          tmp_path,
                                                                          subprocess_env,
                                                                          kill_when, algorithm):
    """Every step's batches and views are drawn from (seed, step) alone: a run killed and
    resumed from its last.ckpt ends with the same classifier, bit for bit, as one never stopped."""
    from safetensors.torch import load_file

    args = finetune_command(tiny_checkpoint, tmp_path, "trainer.steps=60", algorithm=algorithm)
    env = subprocess_env(WANDB_MODE="disabled")
    kill_when([*args, "run_tag=killed-"],
              lambda: any((tmp_path / "ckpt" / "finetuned").glob("killed-*/last.ckpt")), env,
              tmp_path)
    for tag in ("killed-", "straight-"):
        done = subprocess.run([*args, f"run_tag={tag}"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    results = {f.name.split("-")[1]: json.loads(f.read_text())
               for f in (tmp_path / "results").glob("finetune-*.json")}
    assert results["killed"]["resumed_from_step"] > 0  # it was resumed
    assert results["straight"]["resumed_from_step"] == 0
    assert results["killed"]["test_accuracy"] == results["straight"]["test_accuracy"]
    (killed,), (straight,) = ((tmp_path / "ckpt" / "finetuned").glob(f"{tag}*/{CLASSIFIER_FILE}")
                              for tag in ("killed-", "straight-"))
    a, b = load_file(str(killed)), load_file(str(straight))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
