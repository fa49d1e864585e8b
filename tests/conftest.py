"""Shared fixtures: the real dataset (cached by `make setup`), a tiny pretrained checkpoint, and a
label database per test in a temporary folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from fewlabels.config import compose


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("FEWLABELS_LABEL_DB", f"sqlite:///{tmp_path / 'labels.sqlite'}")


def tiny_pretrain_config(tmp: Path, *overrides: str) -> DictConfig:
    return compose("pretrain", ["preset=tiny", f"checkpoint_dir={tmp / 'ckpt'}",
                                f"logger.dir={tmp}", *overrides])


@pytest.fixture(name="tiny_config")
def _tiny_config() -> Callable[..., DictConfig]:
    """``tiny_config(tmp, *overrides)``: the tiny preset writing under ``tmp``."""
    return tiny_pretrain_config


@pytest.fixture(name="subprocess_env")
def _subprocess_env() -> Callable[..., dict[str, str]]:
    """Environment for a child process: without this process's W&B service address, which a
    child would otherwise share (a killed child's run id then stays "in use" there)."""

    def make(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
        return {**env, **extra}

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SimCLR run of the tiny preset (seconds), shared by the probe tests."""
    from fewlabels.ssl.train import pretrain

    tmp = tmp_path_factory.mktemp("tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "disabled")
        return pretrain(tiny_pretrain_config(tmp, "data.limit=2048", "trainer.max_epochs=2"))
