"""Hydra composition from ``configs/`` with overrides, and clear errors for bad keys."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(os.environ.get("FEWLABELS_CONFIGS", Path(__file__).resolve().parent.parent /
                                 "configs"))


# A stage whose primary config sits in another stage's folder, to share its groups: the active
# rounds fine-tune with the same algorithms and presets as ``fewlabels finetune``.
SHARED_FOLDERS: dict[str, str] = {"active": "finetune"}


def _folder(config_name: str) -> Path:
    folder = CONFIG_DIR / SHARED_FOLDERS.get(config_name, config_name)
    return folder if folder.is_dir() else CONFIG_DIR


class ConfigError(ValueError):
    """An override names a key or group that does not exist, or has a bad value."""


def compose(config_name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """``configs/<name>.yaml``, or ``configs/<folder>/<name>.yaml`` when a stage has a folder of
    groups (fine-tuning: ``algorithm/``, ``preset/``), with Hydra overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(_folder(config_name)), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(
            f"bad override in {list(overrides)}: {err}\nKeys and groups are in "
            f"{config_file(config_name)} and the folders beside it; a new key needs '+key=value'."
        ) from err
    OmegaConf.set_struct(cfg, True)  # a typo in code is an error, not a silent None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def config_file(config_name: str) -> Path:
    return _folder(config_name) / f"{config_name}.yaml"
