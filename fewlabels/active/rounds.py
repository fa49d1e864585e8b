"""One active round's folder, ``checkpoints/finetuned/active-<run>-seed<S>/round<k>/``: the names
that every stage reading or carrying rounds uses (the loop, ``replay_from``, ``make evaluate``,
``make keep``), and the results file stem of a run's seeds. ``selection.json`` (the new ids,
saved before they are queried) is the fine-tuning stage's own file name; ``round.json``, written
last, marks a round done."""

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


def seeds_name(name: str, seeds: list[int]) -> str:
    """The results file stem of a run's seeds: the run's name for seeds 0, 1, …, n-1; any other
    seed set gets its own files rather than overwriting those: ``-seeds3-5`` for 3, 4, 5,
    ``-seeds2-2`` for 2 alone and ``-seeds0.2`` for a set with gaps (``make active first_seed=3``,
    ``make evaluate`` on some seeds of a run)."""
    ordered = sorted(seeds)
    if ordered == list(range(len(ordered))):
        return name
    if ordered == list(range(ordered[0], ordered[0] + len(ordered))):
        return f"{name}-seeds{ordered[0]}-{ordered[-1]}"
    return f"{name}-seeds{'.'.join(map(str, ordered))}"


__all__ = ["ROUND_FILE", "SELECTION_FILE", "round_folder", "round_folders", "seeds_name"]
