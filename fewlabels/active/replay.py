"""``replay_from=<run>``: every round buys the ids that another active run's same seed bought in
that round, round 0 included, so that a run on another checkpoint (or with other settings)
learns from exactly the same labels: for example the models of two backbones on the same 250
ids, made one classifier by ``make evaluate ENSEMBLE=1``. Nothing is scored or selected, no label
is read from the source's files: its ``selection.json`` gives each round's new ids, and the
database counts them again under this run's own id."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from fewlabels.active.rounds import ROUND_FILE, SELECTION_FILE, round_folder
from fewlabels.models.checkpoint import CONFIG_FILE, FINETUNED_DIR

REPLAY = "replay"


def replay_tag(replay_from: str) -> str:
    """``replay-<sha8 of the source run's name>``: the part of this run's name and oracle run id
    that says whose ids it buys (a full name would double the length of every path)."""
    return f"{REPLAY}-{hashlib.sha256(replay_from.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class ReplayedRound:
    """One round of the source: its folder and the new ids it bought, in its order."""

    folder: Path
    new_ids: np.ndarray


def replay_rounds(replay_from: str, checkpoint_dir: str, budgets: list[int], seed: int,
                  pool_size: int) -> list[ReplayedRound]:
    """The source's rounds that this run's rounds replay, one per budget; a clear error, before
    anything is bought, when the source did not finish those rounds with those budgets, when its
    files disagree on the ids bought, or when an id lies outside this run's pool."""
    source = Path(checkpoint_dir) / FINETUNED_DIR / f"{replay_from}-seed{seed}"
    hint = ("give the name of an active run that 'make active' printed (results/<name>.csv) and "
            "whose rounds for this seed are finished")
    if not (source / CONFIG_FILE).is_file():
        raise ValueError(f"replay_from={replay_from!r}: {source} holds no active run of seed "
                         f"{seed}; {hint}")
    try:
        theirs = [int(b) for b in OmegaConf.load(source / CONFIG_FILE).budgets]
    except Exception as err:  # noqa: BLE001 — any unreadable config is the same user problem
        raise ValueError(f"replay_from={replay_from!r}: {source / CONFIG_FILE} cannot be read "
                         f"({err}); {hint}") from err
    if theirs[:len(budgets)] != budgets:
        raise ValueError(f"replay_from={replay_from!r}: that run bought budgets={theirs}, so "
                         f"budgets={budgets} cannot retrace its rounds; give "
                         f"budgets=[{','.join(map(str, theirs))}] or a leading part of it")
    rounds, bought = [], []
    for k in range(len(budgets)):
        folder = round_folder(source, k)
        if not ((folder / ROUND_FILE).is_file() and (folder / SELECTION_FILE).is_file()):
            raise ValueError(f"replay_from={replay_from!r}: {folder} holds no finished round {k} "
                             f"of seed {seed}; finish that run first, or {hint}")
        new = json.loads((folder / SELECTION_FILE).read_text())["new_ids"]
        bought += new
        if bought != json.loads((folder / ROUND_FILE).read_text())["ids"]:
            raise ValueError(f"{folder}: its selection.json and round.json disagree on the ids "
                             "bought; its files were changed after it ran, so it cannot be "
                             "replayed")
        if new and max(new) >= pool_size:
            raise ValueError(f"{folder} bought id {max(new)}, outside this run's pool of "
                             f"{pool_size} images: give the source run's pool_limit")
        rounds.append(ReplayedRound(folder, np.array(new, dtype=np.int64)))
    return rounds
