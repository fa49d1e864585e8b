"""Fine-tuning a pretrained backbone on the queried labels and the unlabeled pool.

``ALGORITHMS`` maps ``algorithm.name`` to a :class:`~fewlabels.semisup.base.Learner` subclass
and the function that reads its settings from the config (config stops here: the learners take
typed, frozen settings). A new algorithm is one file, one line here and one YAML in
``configs/finetune/algorithm/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fewlabels.semisup.base import BatchSettings, Learner, OptimizerSettings
from fewlabels.semisup.fixmatch import FixMatch, FixMatchSettings
from fewlabels.semisup.flexmatch import FlexMatch
from fewlabels.semisup.selftrain import SelfTrain, SelfTrainSettings
from fewlabels.semisup.simmatch import SimMatch, SimMatchSettings
from fewlabels.semisup.softmatch import SoftMatch, SoftMatchSettings
from fewlabels.semisup.supervised import Supervised


def _no_settings(cfg: Any) -> dict[str, Any]:
    return {}


def _fixmatch(cfg: Any) -> dict[str, Any]:
    return {"settings": FixMatchSettings(float(cfg.threshold), float(cfg.lambda_u),
                                         str(cfg.pseudo_label_model))}


def _softmatch(cfg: Any) -> dict[str, Any]:
    return {"settings": SoftMatchSettings(float(cfg.lambda_u), str(cfg.pseudo_label_model),
                                          float(cfg.n_sigma), float(cfg.momentum),
                                          bool(cfg.uniform_alignment))}


def _simmatch(cfg: Any) -> dict[str, Any]:
    return {"settings": SimMatchSettings(float(cfg.threshold), float(cfg.lambda_u),
                                         str(cfg.pseudo_label_model), float(cfg.lambda_in),
                                         float(cfg.temperature), float(cfg.smoothing_alpha),
                                         int(cfg.projection_dim))}


def _selftrain(cfg: Any) -> dict[str, Any]:
    return {"settings": SelfTrainSettings(float(cfg.teacher_fraction), int(cfg.generations),
                                          float(cfg.temperature), float(cfg.lambda_u))}


# Self-training whose teacher is the model the round starts from: it trains only the round that
# `make active`'s distill_fraction adds after the last (a fine-tuned model teaching itself).
DISTILL = "distill"

ALGORITHMS: dict[str, tuple[type[Learner], Callable[[Any], dict[str, Any]]]] = {
    "supervised": (Supervised, _no_settings),
    "fixmatch": (FixMatch, _fixmatch),
    "flexmatch": (FlexMatch, _fixmatch),
    "softmatch": (SoftMatch, _softmatch),
    "simmatch": (SimMatch, _simmatch),
    "selftrain": (SelfTrain, _selftrain),
    DISTILL: (SelfTrain, _selftrain),
}

__all__ = ["ALGORITHMS", "DISTILL", "BatchSettings", "FixMatch", "FlexMatch", "Learner",
           "OptimizerSettings", "SelfTrain", "SimMatch", "SoftMatch", "Supervised"]
