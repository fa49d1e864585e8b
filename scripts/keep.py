"""The files of a run that `make keep` puts in git, so that the run continues in a fresh clone on
another machine (checkpoints/ is ignored, and a work tree laid anew loses it):

- a pretrained backbone folder: ``backbone.safetensors``, ``config.yaml``, ``provenance.json``
  (what probes, fine-tuning and active rounds read; not ``last.ckpt``, so it is never trained
  further: ``make pretrain`` refuses to train over it). A pretraining run with steps left (killed
  before it exported, or stopped by ``trainer.max_time``) is kept only with ``--training-state``:
  then its ``last.ckpt`` and ``wandb_run_id`` too, and the same ``make pretrain`` command
  continues it in a fresh clone (a run longer than one session);
- an active seed folder (``checkpoints/finetuned/active-…-seed<S>``): its ``config.yaml``, every
  round's ``selection.json`` and ``round.json`` (a round with it is read back, not trained), and
  the ``model.safetensors`` of its last two finished rounds: the last is what the next round
  starts from and scores the pool with, the one before it is where a run that trains only the
  last round otherwise starts (``branch_from``). Training state and the other rounds' models stay
  out: a few MB in all.
- with ``--training-state`` (``make keep UNFINISHED=1``), also the ``last.ckpt`` and
  ``wandb_run_id`` of a round killed mid-training (its ``selection.json`` there, no
  ``round.json``): a fresh clone then resumes that round at the step it reached instead of
  training it again from the last finished model. About 15 MB for the CPU preset; for a session
  that ends in the middle of a long round.

The ledger of the labels those rounds were told (``checkpoints/ledger.json``) goes with them;
``make setup`` imports it, and a finished round is read back only where the database holds it.

Kept again later, a folder's tracked files become what it names then: ``--stale`` prints the
files git tracks there that it no longer names (a ``last.ckpt`` carried while its round was
unfinished, once that round has ended; the model of a round that is no longer among the last
two), for ``make keep`` to untrack (``git rm --cached``: the work tree keeps them).
Usage: python scripts/keep.py [--training-state] [--stale] FOLDER [FOLDER ...]
(prints the paths to add, or with ``--stale`` to untrack, one a line)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fewlabels.active.rounds import ROUND_FILE, SELECTION_FILE, round_folders
from fewlabels.models.checkpoint import (
    BACKBONE_FILE,
    CLASSIFIER_FILE,
    CONFIG_FILE,
    LAST_FILE,
    PROVENANCE_FILE,
    WANDB_ID_FILE,
    pretraining_unfinished,
)


def files_to_keep(folder: Path, training_state: bool = False) -> list[Path]:
    """The files of ``folder`` that carry it to another machine; with ``training_state``, also
    what resumes its unfinished round at its step, or its pretraining run where it stopped.
    ValueError for any other folder, and for a pretraining run with steps left without
    ``training_state``."""
    rounds = round_folders(folder)
    if not rounds and pretraining_unfinished(folder):
        if not training_state:
            raise ValueError(f"{folder} is a pretraining run with steps left (its {LAST_FILE} "
                             "resumes it; the backbone is not the one its command describes): "
                             "give UNFINISHED=1 to carry its training state, then run the same "
                             "make pretrain command again to finish it")
        return [folder / name for name in (BACKBONE_FILE, CONFIG_FILE, PROVENANCE_FILE,
                                           LAST_FILE, WANDB_ID_FILE) if (folder / name).is_file()]
    if (folder / BACKBONE_FILE).is_file():
        return [folder / name for name in (BACKBONE_FILE, CONFIG_FILE, PROVENANCE_FILE)
                if (folder / name).is_file()]
    if not (folder / CONFIG_FILE).is_file() or not rounds:
        raise ValueError(f"{folder} is neither a pretrained backbone folder (with "
                         f"{BACKBONE_FILE}) nor an active seed folder (with {CONFIG_FILE} and "
                         "round<k>/): give checkpoints/<run> or "
                         "checkpoints/finetuned/active-<run>-seed<S>")
    kept = [folder / CONFIG_FILE]
    finished = [r for r in rounds if (r / ROUND_FILE).is_file()]
    for r in rounds:
        kept += [r / name for name in (SELECTION_FILE, ROUND_FILE) if (r / name).is_file()]
    kept += [r / CLASSIFIER_FILE for r in finished[-2:] if (r / CLASSIFIER_FILE).is_file()]
    if training_state:
        unfinished = [r for r in rounds if (r / SELECTION_FILE).is_file()
                      and not (r / ROUND_FILE).is_file() and (r / LAST_FILE).is_file()]
        kept += [r / name for r in unfinished for name in (LAST_FILE, WANDB_ID_FILE)
                 if (r / name).is_file()]
    return kept


def stale_files(folder: Path, training_state: bool = False) -> list[Path]:
    """The files git tracks in ``folder`` (committed or staged, present in the work tree or not)
    that ``files_to_keep`` no longer names. ValueError where ``folder`` is not in a git work
    tree."""
    kept = set(files_to_keep(folder, training_state))
    listing = subprocess.run(["git", "-C", str(folder), "ls-files", "-z"],
                             capture_output=True, text=True)
    if listing.returncode != 0:
        raise ValueError(f"{folder} is not in a git work tree ({listing.stderr.strip()}): "
                         "make keep stages files in the clone that holds them")
    tracked = [folder / name for name in listing.stdout.split("\0") if name]
    return [p for p in tracked if p not in kept]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--training-state", action="store_true",
                        help="also keep the last.ckpt of a round killed mid-training, or of "
                             "a pretraining run with steps left")
    parser.add_argument("--stale", action="store_true",
                        help="print the tracked files the folders no longer keep instead")
    args = parser.parse_args()
    listed = stale_files if args.stale else files_to_keep
    try:
        paths = [p for folder in args.folders for p in listed(folder, args.training_state)]
    except ValueError as err:
        print(f"keep: {err}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
