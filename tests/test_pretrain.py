import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fewlabels.runtime as runtime
from fewlabels.config import ConfigError, compose
from fewlabels.data.fashion_mnist import FILES, locate
from fewlabels.models.backbones import build_backbone
from fewlabels.models.checkpoint import CheckpointError, open_checkpoint, pretraining_unfinished
from fewlabels.runtime import InvocationTimer, cpu_has_native_bf16, resolve_precision
from fewlabels.ssl.base import cosine, seconds
from fewlabels.ssl.train import pretrain
from fewlabels.tracking import offline_run_file, read_offline_run


def _history(tmp: Path, ckpt: Path) -> list[dict]:
    run_id = (ckpt / "wandb_run_id").read_text().strip()
    return read_offline_run(offline_run_file(tmp / "wandb", run_id))["history"]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_tiny_run_end_to_end(method, tmp_path, monkeypatch, tiny_config):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config(tmp_path, f"method={method}", "trainer.max_epochs=3")
    ckpt = pretrain(cfg)

    assert {p.name for p in ckpt.iterdir()} >= {"last.ckpt", "backbone.safetensors",
                                                 "config.yaml", "provenance.json"}
    backbone = build_backbone(compose("pretrain", ["preset=tiny"]).backbone)
    backbone.load_state_dict(load_file(str(ckpt / "backbone.safetensors")))
    assert backbone(torch.zeros(2, 1, 28, 28)).shape == (2, backbone.num_features)
    provenance = json.loads((ckpt / "provenance.json").read_text())
    assert provenance["epochs_completed"] == 3 and provenance["method"] == method
    assert provenance["train_images_md5"] == FILES["train-images"].md5

    history = _history(tmp_path, ckpt)
    epoch_loss = [row["train/loss_epoch"] for row in history if "train/loss_epoch" in row]
    assert len(epoch_loss) == 3 and all(map(torch.isfinite, torch.tensor(epoch_loss)))
    assert epoch_loss[-1] < epoch_loss[0]
    logged = set().union(*history)
    assert {"health/rankme", "health/collapse_std", "train/images_per_sec_step",
            "lr-SGD"} <= logged
    if method == "byol":
        assert "train/momentum" in logged
    rankme = [row["health/rankme"] for row in history if "health/rankme" in row]
    assert all(1 <= r <= backbone.num_features for r in rankme)


def test_resume_continues_the_same_run(tmp_path, monkeypatch, tiny_config):
    monkeypatch.setenv("WANDB_MODE", "offline")
    ckpt = pretrain(tiny_config(tmp_path, "trainer.max_epochs=1"))
    first = json.loads((ckpt / "provenance.json").read_text())
    time.sleep(1.1)  # W&B names offline folders by the second; keep the two apart to count them
    again = pretrain(tiny_config(tmp_path, "trainer.max_epochs=2"))
    second = json.loads((again / "provenance.json").read_text())
    assert again == ckpt and second["resumed_from"] == str(ckpt / "last.ckpt")
    assert second["global_step"] == 2 * first["global_step"]
    assert second["wandb_run_id"] == first["wandb_run_id"]
    run_files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{first['wandb_run_id']}/*.wandb"))
    assert len(run_files) == 2
    epochs = [row["epoch"] for f in run_files for row in read_offline_run(f)["history"]
              if "train/loss_epoch" in row]
    assert epochs == [0, 1]  # the resumed invocation logged only the epoch it trained


def test_a_shipped_backbone_without_training_state_is_never_overwritten(tmp_path, tiny_config):
    """A finished backbone folder without last.ckpt (shipped in git, or copied) cannot be resumed:
    the same command says so before it writes anything, instead of training over it."""
    folder = tmp_path / "ckpt" / "simclr-tiny-seed0"
    folder.mkdir(parents=True)
    (folder / "backbone.safetensors").write_bytes(b"the shipped weights")
    (folder / "config.yaml").write_text("seed: 0\n")
    with pytest.raises(ValueError, match="without its training state.*run_name=<another name>"):
        pretrain(tiny_config(tmp_path, "trainer.max_epochs=1"))
    assert (folder / "backbone.safetensors").read_bytes() == b"the shipped weights"
    assert {p.name for p in folder.iterdir()} == {"backbone.safetensors", "config.yaml"}
    assert (folder / "config.yaml").read_text() == "seed: 0\n"


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bf16(cpuinfo)
    cpuinfo.write_text("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not cpu_has_native_bf16(cpuinfo)
    assert not cpu_has_native_bf16(tmp_path / "absent")

    cpu = compose("pretrain", ["preset=cpu"]).trainer
    assert cpu.precision == "auto"
    monkeypatch.setattr("fewlabels.runtime.cpu_has_native_bf16", lambda: True)
    assert resolve_precision(cpu) == "bf16-mixed"
    monkeypatch.setattr("fewlabels.runtime.cpu_has_native_bf16", lambda: False)
    assert resolve_precision(cpu) == "32-true"
    assert resolve_precision(compose("pretrain", ["preset=tiny"]).trainer) == "32-true"


def test_resolved_precision_is_what_the_checkpoint_records(tmp_path, tiny_config):
    ckpt = pretrain(tiny_config(tmp_path, "trainer.precision=auto", "trainer.max_epochs=1",
                                "trainer.channels_last=true"))
    recorded = (ckpt / "config.yaml").read_text()
    assert "precision: auto" not in recorded
    expected = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    assert f"precision: {expected}" in recorded


def test_schedule_helpers():
    assert seconds("00:00:07:00") == 420 and seconds("01:02:03:04") == 93784
    assert seconds(None) is None
    assert cosine(0.0, 1.0, 0.0) == pytest.approx(1.0)
    assert cosine(0.5, 1.0, 0.0) == pytest.approx(0.5)
    assert cosine(1.0, 0.99, 1.0) == pytest.approx(1.0) and cosine(2.0, 0.99, 1.0) == 1.0


def test_the_learning_rate_follows_a_fake_clock_when_the_time_budget_comes_first(tiny_config,
                                                                                 tmp_path):
    """The schedule on a clock the test sets: no real time, no noise. The budget moves it; the
    per-invocation safety net ``trainer.max_time`` never does."""
    from fewlabels.runtime import BudgetTimer, InvocationTimer
    from fewlabels.ssl import method_class

    class FakeBudget(BudgetTimer):
        now = 0.0

        def time_elapsed(self, stage: str = "train") -> float:
            return self.now

    class FakeCap(InvocationTimer):
        now = 0.0

        def time_elapsed(self, stage: str = "train") -> float:
            return self.now

    def factors(timer, *overrides: str) -> list[float]:
        cfg = tiny_config(tmp_path, "trainer.max_epochs=200", "optimizer.warmup_epochs=0",
                          *overrides)
        module = method_class("simclr")(cfg)
        module._trainer = type("T", (), {"callbacks": [timer],
                                         "estimated_stepping_batches": 1200})()
        factor = module.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
        seen = []
        for now, step in [(0.0, 1), (25.0, 3), (50.0, 6), (75.0, 9), (100.0, 12)]:
            timer.now = now  # 100 s; 1,200 steps would take far longer
            seen.append(factor(step))
        return seen

    by_budget = factors(FakeBudget(duration="00:00:01:40"), "trainer.time_budget=00:00:01:40")
    assert by_budget[0] == pytest.approx(1.0, abs=0.01)
    assert by_budget[2] == pytest.approx(0.5, abs=0.01)  # half the time: half way down
    assert by_budget[-1] == pytest.approx(0.0, abs=1e-6)
    assert all(a > b for a, b in zip(by_budget, by_budget[1:], strict=False))
    by_cap = factors(FakeCap(duration="00:00:01:40"), "trainer.max_time=00:00:01:40")
    assert min(by_cap) > 0.99  # 12 of 1,200 steps: the cosine has hardly moved


@pytest.mark.parametrize("method", ["byol"])
def test_the_schedules_end_when_the_time_budget_ends_the_run(method, tmp_path, monkeypatch,
                                                             tiny_config):
    """A loose real-time smoke run: max_epochs=200 would take minutes; a 6-second budget ends it
    after a few per cent of its steps, and the learning rate and BYOL's momentum have moved
    with the clock, further along their cosines than the steps alone would move them. How far
    depends on the machine's load (the last value is logged some steps before the end), so this
    only checks that the clock, not the step count, set them; the exact curve is checked on the
    fake clock above. The budget counts over resumes: the same command again trains no more."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config(tmp_path, f"method={method}", "trainer.max_epochs=200",
                      "trainer.time_budget=00:00:00:06", "optimizer.warmup_epochs=0")
    ckpt = pretrain(cfg)
    provenance = json.loads((ckpt / "provenance.json").read_text())
    total_steps = 200 * (cfg.data.limit // cfg.data.batch_size)
    by_steps = provenance["global_step"] / total_steps  # the furthest the steps alone could go
    assert by_steps < 0.5 and provenance["ended_by"] == "time budget"
    ahead = by_steps + 0.05  # the clock must have moved the schedules at least this far
    history = _history(tmp_path, ckpt)
    lrs = [row["lr-SGD"] for row in history if "lr-SGD" in row]
    base_lr = cfg.optimizer.lr * cfg.data.batch_size / 256
    assert lrs[0] == pytest.approx(base_lr, rel=0.05)
    assert len(lrs) >= 2 and lrs[-1] < cosine(ahead, base_lr, 0.0)
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    if method == "byol":  # from momentum_start 0.99 towards momentum_end 1.0
        momentum = [row["train/momentum"] for row in history if "train/momentum" in row]
        assert momentum[0] == pytest.approx(0.99, abs=1e-3)
        assert momentum[-1] > cosine(ahead, 0.99, 1.0)
    pretrain(cfg)  # spent: resumes, stops at once
    again = json.loads((ckpt / "provenance.json").read_text())
    assert again["global_step"] == provenance["global_step"]
    assert again["ended_by"] == "time budget"


def test_the_time_cap_stops_one_invocation_and_the_same_command_continues(tmp_path,
                                                                           monkeypatch,
                                                                           tiny_config):
    """``trainer.max_time`` is a safety net per invocation: it stops the run loudly, the same
    command continues it (Lightning's own Timer would stop it again at once), and the learning
    rate follows the steps only, so the interrupted run is the one its command describes."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config(tmp_path, "trainer.max_epochs=200", "trainer.max_time=00:00:00:03",
                      "optimizer.warmup_epochs=0")
    ckpt = pretrain(cfg)
    first = json.loads((ckpt / "provenance.json").read_text())
    assert first["ended_by"] == "time cap" and first["global_step"] > 0
    time.sleep(1.1)  # W&B names offline folders by the second
    pretrain(cfg)
    second = json.loads((ckpt / "provenance.json").read_text())
    assert second["ended_by"] == "time cap"
    assert second["global_step"] > first["global_step"]  # trained on, not stopped at once
    assert second["wall_time_s"] > second["wall_time_s_this_invocation"]
    total_steps = 200 * (cfg.data.limit // cfg.data.batch_size)
    base_lr = cfg.optimizer.lr * cfg.data.batch_size / 256
    lrs = [row["lr-SGD"] for row in _history(tmp_path, ckpt) if "lr-SGD" in row]
    # the steps alone: at most this far down the cosine, however long the invocations took
    assert min(lrs) >= cosine(second["global_step"] / total_steps, base_lr, 0.0) * 0.999


def test_a_run_longer_than_a_session_is_carried_with_its_state_and_finished_in_a_fresh_clone(
        tmp_path, monkeypatch, tiny_config, keep):
    """A pretraining run with steps left: ``trainer.max_time`` runs out at step 3 of 12 (a fake
    clock in the real timer path) and stops it at the end of that epoch, step 6 (inside an epoch,
    Lightning would count the epoch as done and a resume would skip its rest). ``make keep``
    refuses the run without ``UNFINISHED=1`` (its backbone is not the one its command describes)
    and with it adds ``last.ckpt`` and the W&B id; in a fresh clone the same command trains the
    6 steps left on the same run and ends by its epochs; kept again, that state is untracked."""

    class OutOfTimeFromStep3(InvocationTimer):
        step = 0

        def on_train_batch_end(self, trainer, *args, **kwargs) -> None:
            self.step = trainer.global_step
            super().on_train_batch_end(trainer, *args, **kwargs)

        def time_elapsed(self, stage: str = "train") -> float:
            return 1e9 if self.step >= 3 else 0.0

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setattr(runtime, "InvocationTimer", OutOfTimeFromStep3)
    folder = pretrain(tiny_config(tmp_path, "trainer.max_epochs=2", "trainer.max_time=00:01:00:00"))
    first = json.loads((folder / "provenance.json").read_text())
    assert first["ended_by"] == "time cap" and first["global_step"] == 6  # not "epochs"
    assert first["epochs_completed"] == 1 and first["steps_configured"] == 12
    assert pretraining_unfinished(folder)
    with pytest.raises(CheckpointError, match="stopped short.*run the same 'make pretrain'"):
        open_checkpoint(folder)  # probes, fine-tuning and active rounds never use it as it is
    with pytest.raises(ValueError, match="steps left.*UNFINISHED=1"):
        keep.files_to_keep(folder)
    kept = keep.files_to_keep(folder, training_state=True)
    assert sorted(p.name for p in kept) == ["backbone.safetensors", "config.yaml", "last.ckpt",
                                            "provenance.json", "wandb_run_id"]

    clone = tmp_path / "clone"
    carried = clone / "ckpt" / folder.name
    carried.mkdir(parents=True)
    for path in kept:
        shutil.copyfile(path, carried / path.name)
    subprocess.run(["git", "init", "-q", str(clone)], check=True)
    subprocess.run(["git", "-C", str(carried), "add", "-f", "."], check=True)  # as committed
    time.sleep(1.1)  # W&B names offline folders by the second
    assert pretrain(tiny_config(clone, "trainer.max_epochs=2")) == carried
    finished = json.loads((carried / "provenance.json").read_text())
    assert finished["resumed_from"] == str(carried / "last.ckpt")
    assert finished["ended_by"] == "epochs" and finished["global_step"] == 12
    assert finished["wandb_run_id"] == first["wandb_run_id"]
    assert not pretraining_unfinished(carried)
    assert open_checkpoint(carried).folder == carried.resolve()
    assert sorted(p.name for p in keep.files_to_keep(carried, training_state=True)) == [
        "backbone.safetensors", "config.yaml", "provenance.json"]
    assert sorted(p.name for p in keep.stale_files(carried)) == ["last.ckpt", "wandb_run_id"]

    # What a kill before the export leaves (config.yaml and an epoch's last.ckpt) is carried too.
    killed = tmp_path / "killed"
    killed.mkdir()
    for name in ("config.yaml", "last.ckpt"):
        shutil.copyfile(folder / name, killed / name)
    assert pretraining_unfinished(killed)
    assert sorted(p.name for p in keep.files_to_keep(killed, training_state=True)) == [
        "config.yaml", "last.ckpt"]


def test_bad_config_keys_say_what_is_wrong():
    with pytest.raises(ConfigError,
                       match=r"(?s)Could not override .trainer.max_epoch.*\+key=value"):
        compose("pretrain", ["trainer.max_epoch=3"])
    with pytest.raises(ConfigError, match="method"):
        compose("pretrain", ["method=mocov9"])
    cfg = compose("pretrain", ["preset=tiny", "backbone.name=vgg"])
    with pytest.raises(ValueError, match="backbone.name='vgg'"):
        build_backbone(cfg.backbone)


@pytest.mark.parametrize("override", ["trainer.max_time=2h", "trainer.time_budget=00:01:00"])
def test_a_bad_duration_says_how_to_write_one_before_any_file(override, tmp_path, tiny_config):
    with pytest.raises(ValueError, match=r"trainer\.(max_time|time_budget).*DD:HH:MM:SS"):
        pretrain(tiny_config(tmp_path, override))
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


NO_LABELS = """
import os, sys
def guard(event, args):
    name = os.path.basename(str(args[0])) if event == "open" and args else ""
    if "labels-idx1" in name or name.endswith(".sqlite") or name.endswith("test-labels.npy"):
        print("OPENED", args[0], flush=True)
        os._exit(99)
    if event == "sqlite3.connect":
        print("SQLITE", args, flush=True)
        os._exit(98)
sys.addaudithook(guard)
from fewlabels.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_pretraining_reads_only_the_training_images(tmp_path, subprocess_env):
    only_images = tmp_path / "only-images"
    only_images.mkdir()
    (only_images / FILES["train-images"].filename).symlink_to(locate("train-images"))
    env = subprocess_env(FASHION_MNIST_DIR=str(only_images), WANDB_MODE="disabled",
                         FEWLABELS_DATA=str(tmp_path / "data"),
                         FEWLABELS_LABEL_DB=f"sqlite:///{tmp_path / 'absent.sqlite'}")
    proc = subprocess.run(
        [sys.executable, "-c", NO_LABELS, "pretrain", "preset=tiny", "trainer.max_epochs=1",
         f"checkpoint_dir={tmp_path / 'ckpt'}", f"logger.dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "OPENED" not in proc.stdout and "SQLITE" not in proc.stdout
    assert (tmp_path / "ckpt" / "simclr-tiny-seed0" / "backbone.safetensors").is_file()
    assert not (tmp_path / "absent.sqlite").exists()


def test_ddp_on_two_cpu_processes_with_gloo(tmp_path, subprocess_env):
    """Lightning re-launches the console script per rank, so this runs the real CLI."""
    script = Path(sys.executable).parent / "fewlabels"
    env = subprocess_env(WANDB_MODE="disabled")
    proc = subprocess.run(
        [str(script), "pretrain", "preset=tiny", "trainer.devices=2", "trainer.strategy=ddp",
         "trainer.max_epochs=1", f"checkpoint_dir={tmp_path / 'ckpt'}", f"logger.dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stdout + proc.stderr
    provenance = json.loads((tmp_path / "ckpt" / "simclr-tiny-seed0" /
                             "provenance.json").read_text())
    assert provenance["global_step"] == 384 // (64 * 2)  # each rank takes half of each epoch


def test_killed_run_resumes_from_its_last_epoch(tmp_path, subprocess_env):
    script = Path(sys.executable).parent / "fewlabels"
    args = [str(script), "pretrain", "preset=tiny", "data.limit=128", "data.batch_size=32",
            f"checkpoint_dir={tmp_path / 'ckpt'}", f"logger.dir={tmp_path}"]
    env = subprocess_env(WANDB_MODE="offline")
    ckpt = tmp_path / "ckpt" / "simclr-tiny-seed0"
    proc = subprocess.Popen([*args, "trainer.max_epochs=1000"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (ckpt / "last.ckpt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # let it train on past the first checkpoint
    proc.kill()
    proc.wait()
    assert (ckpt / "last.ckpt").exists() and not (ckpt / "backbone.safetensors").exists()
    saved = torch.load(ckpt / "last.ckpt", weights_only=False, map_location="cpu")
    assert saved["epoch"] >= 0  # complete: a kill mid-save leaves only a .tmp beside it

    target_epochs = saved["epoch"] + 3
    done = subprocess.run([*args, f"trainer.max_epochs={target_epochs}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    provenance = json.loads((ckpt / "provenance.json").read_text())
    assert provenance["resumed_from"] == str(ckpt / "last.ckpt")
    assert not list(ckpt.glob(".*.tmp"))  # leftovers of the killed save are cleared
    assert provenance["epochs_completed"] == target_epochs
    assert provenance["global_step"] == target_epochs * (128 // 32)
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{provenance['wandb_run_id']}"))
    assert len(runs) == 2  # both invocations wrote to the same W&B run id
    second = read_offline_run(sorted(runs)[-1] / f"run-{provenance['wandb_run_id']}.wandb")
    steps = [row["trainer/global_step"] for row in second["history"]
             if "trainer/global_step" in row]
    assert steps and min(steps) >= saved["global_step"]  # it trained only what was left


def test_a_killed_and_resumed_run_ends_with_the_weights_of_one_never_stopped(tmp_path,
                                                                            subprocess_env,
                                                                            kill_when):
    """The shuffle and the views of every step are drawn from (seed, epoch or step) alone, so a
    resume does not replay the draws of its first epoch: the backbone is the same bit for bit."""
    script = Path(sys.executable).parent / "fewlabels"
    args = [str(script), "pretrain", "preset=tiny", "data.limit=128", "data.batch_size=32",
            "trainer.max_epochs=8", f"checkpoint_dir={tmp_path / 'ckpt'}",
            f"logger.dir={tmp_path}"]
    env = subprocess_env(WANDB_MODE="disabled")
    killed = tmp_path / "ckpt" / "killed"
    kill_when([*args, "run_name=killed"], (killed / "last.ckpt").exists, env)
    for name in ("killed", "straight"):
        done = subprocess.run([*args, f"run_name={name}"], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    provenance = json.loads((killed / "provenance.json").read_text())
    assert provenance["resumed_from"] == str(killed / "last.ckpt")  # it was resumed
    assert provenance["epochs_completed"] == 8
    resumed = load_file(str(killed / "backbone.safetensors"))
    straight = load_file(str(tmp_path / "ckpt" / "straight" / "backbone.safetensors"))
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in resumed)
