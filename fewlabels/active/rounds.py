"""One active round's folder, ``checkpoints/finetuned/active-<run>-seed<S>/round<k>/``: the names
that every stage reading or carrying rounds uses (the loop, ``replay_from``, ``make evaluate``,
``make keep``). ``selection.json`` (the new ids, saved before they are queried) is the fine-tuning
stage's own file name; ``round.json``, written last, marks a round done."""

from __future__ import annotations

from pathlib import Path

from fewlabels.semisup.run import SELECTION_FILE

ROUND_FILE = "round.json"


def round_folder(seed_folder: Path, k: int) -> Path:
    """Round ``k``'s folder in a seed folder."""
    return seed_folder / f"round{k}"


def round_folders(seed_folder: Path) -> list[Path]:
    """A seed folder's ``round<k>/`` folders, in round order (finished or not)."""
    return sorted((p for p in seed_folder.glob("round*") if p.name[5:].isdigit()),
                  key=lambda p: int(p.name[5:]))


__all__ = ["ROUND_FILE", "SELECTION_FILE", "round_folder", "round_folders"]
