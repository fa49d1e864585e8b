"""What every training stage shares: the resolved precision, checkpoint writes that are never
half done, a run's training time summed over its resumes, its time limits, and its provenance
(commit, hardware)."""

from __future__ import annotations

import platform
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.plugins.io import TorchCheckpointIO

from fewlabels.files import atomic_path


class CheckpointFileError(ValueError):
    """A resume checkpoint (last.ckpt) cannot be read."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints go to a temporary file first: a killed run never leaves half a last.ckpt.
    They are read back with ``weights_only=True``: a file handed to us runs no pickle code, and
    a damaged one is an error that names it."""

    def load_checkpoint(self, path: Any, map_location: Any = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        import pickle
        import zipfile

        try:
            return torch.load(path, map_location=map_location or "cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile,
                pickle.UnpicklingError) as err:
            raise CheckpointFileError(
                f"{path} cannot be loaded ({err}); it is damaged or not a checkpoint of this "
                f"project. Move it away to start that run from scratch, or restore it.") from err

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any = None) -> None:
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def step_seed(seed: int, *counters: int) -> int:
    """One 63-bit seed for (a run's seed, its epoch or step, its rank, ...): distinct counters
    give unrelated streams, the same counters the same stream, in any process."""
    mixed = seed
    for counter in counters:
        mixed = (mixed * 6364136223846793005 + counter * 1442695040888963407 + 1) % 2**63
    return mixed


class StepSeeds(pl.Callback):
    """Seeds torch's global generator before every training step from (run seed, step, rank).
    The random numbers a step draws (the views made on the training device, dropout) are then a
    function of the step alone, so a run killed and resumed from ``last.ckpt`` trains exactly as
    one that never stopped, instead of replaying the draws of step 0 after every resume."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.seed, trainer.global_step, trainer.global_rank))


class EpochShuffle(torch.utils.data.Sampler[int]):
    """A random order of ``n`` indices that depends on (seed, epoch) only. Lightning calls
    ``set_epoch`` at every epoch's start (as for ``DistributedSampler``; under DDP its
    ``DistributedSamplerWrapper`` passes the epoch on and shards this order), so a resumed run
    shuffles its remaining epochs as an uninterrupted one would."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Any:
        g = torch.Generator().manual_seed(step_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())


class TrainingClock(pl.Callback):
    """A run's wall time over all its invocations: the seconds recorded in the checkpoint it
    resumed from plus this invocation's. It is saved in every ``last.ckpt``, so a run killed and
    resumed reports the time it took in all, not only its last part (the work a killed
    invocation did after its last checkpoint is redone by the next one and counted once)."""

    def __init__(self) -> None:
        self.started = time.time()
        self.before = 0.0

    @property
    def this_invocation(self) -> float:
        return time.time() - self.started

    @property
    def seconds(self) -> float:
        return self.before + self.this_invocation

    def state_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = float(state_dict["seconds"])


def seconds(duration: str | None) -> float | None:
    """A "DD:HH:MM:SS" duration (``trainer.time_budget``, ``trainer.max_time``) in seconds; None
    when there is none. Anything else is a ValueError that says how to write it."""
    if duration is None or duration == "":
        return None
    parts = str(duration).split(":")
    if len(parts) != 4 or not all(part.isdigit() for part in parts):
        raise ValueError(f"{duration!r} is not a duration: write DD:HH:MM:SS (00:02:00:00 is two "
                         "hours), or null for none")
    days, hours, minutes, secs = (int(part) for part in parts)
    return ((days * 24 + hours) * 60 + minutes) * 60 + secs


def check_durations(trainer_cfg: Mapping[str, Any]) -> None:
    """``trainer.max_time`` and, where the stage has it, ``trainer.time_budget``: checked before
    any file is written."""
    for key in ("max_time", "time_budget"):
        try:
            seconds(trainer_cfg.get(key))
        except ValueError as err:
            raise ValueError(f"trainer.{key}: {err}") from None


class InvocationTimer(Timer):
    """``trainer.max_time``, a safety net for one invocation (a session's end, a shared machine).
    Lightning's own Timer carries its elapsed time over a resume, so the run it stopped stops
    again at once when its command is run again; this one counts this invocation only, so the
    same command continues where the cap stopped it. No schedule follows it: a run it stopped,
    then resumed to its end, is the run its command describes."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """This invocation's time only: nothing carried over from the checkpoint."""


class BudgetTimer(Timer):
    """``trainer.time_budget`` (pretraining only): the run's training time over all its
    invocations, carried over a resume as Lightning's Timer does. The run ends when it is spent,
    and the schedules follow it when it is further along than the steps, so a run on hardware of
    unknown speed (a lent GPU) still ends annealed. Such a run ends by design, not by accident."""


def time_limits(max_time: str | None, time_budget: str | None = None,
                cap_interval: str = "step") -> list[Timer]:
    """The timer callbacks for ``trainer.max_time`` and ``trainer.time_budget`` ("DD:HH:MM:SS";
    None or empty: no limit). Pass them as callbacks, never as ``Trainer(max_time=...)``.
    ``cap_interval="epoch"``: ``max_time`` stops the run only at an epoch's end, for a run that
    ends by ``max_epochs``: Lightning counts an epoch a timer cut short as done, so resuming from
    a checkpoint saved inside it would skip that epoch's remaining steps."""
    timers: list[Timer] = []
    if max_time:
        timers.append(InvocationTimer(duration=str(max_time), interval=cap_interval))
    if time_budget:
        timers.append(BudgetTimer(duration=str(time_budget), interval="step"))
    return timers


def budget_spent(trainer: pl.Trainer) -> bool:
    """Whether the run's ``trainer.time_budget`` (a :class:`BudgetTimer`) is used up."""
    timer = next((c for c in trainer.callbacks if isinstance(c, BudgetTimer)), None)
    remaining = timer.time_remaining("train") if timer is not None else None
    return remaining is not None and remaining <= 0


def wall_time_s(result: Mapping[str, Any]) -> float:
    """A result file's wall time over all invocations (``wall_time_s``); files written before
    that field existed have only ``wall_time_s_this_invocation``."""
    return float(result.get("wall_time_s", result["wall_time_s_this_invocation"]))


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions natively (on a 2-core EPYC with
    AVX512-BF16: 1.5x the fp32 images/s with channels_last, `make bench-precision`). Without
    them bf16 is emulated (on an AVX2-only EPYC: 0.11x), so ``auto`` stays fp32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_precision(trainer_cfg: Any) -> str:
    """``trainer.precision=auto``: bf16-mixed where the hardware computes bf16 natively (a CUDA
    GPU that supports it, a CPU with AVX512-BF16/AMX); 16-mixed on an older CUDA GPU; 32-true on
    other CPUs. Other values pass as is."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    if trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout
        return out.stdout.strip() + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


