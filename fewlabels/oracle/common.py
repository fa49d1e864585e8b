"""What both label-database backends share: errors, run statistics, id validation."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 1  # of the tables labels, runs, queries and meta, on every backend


class BudgetExceeded(RuntimeError):
    """A query would reveal more labels than the run's budget allows; nothing was revealed."""


class LabelDatabaseError(RuntimeError):
    """The database URL, file or server is not usable."""


@dataclass(frozen=True)
class RunStats:
    run_id: str
    budget: int | None
    labels_revealed: int
    first_query: float | None
    last_query: float | None


def labels_checksum(pairs: Iterable[tuple[int, int]]) -> str:
    """MD5 of ``image_id:label`` lines in id order: the official file's fingerprint, compared
    with a database's by ``fewlabels oracle init`` (PostgreSQL computes the same server-side)."""
    digest = hashlib.md5()
    for image_id, label in pairs:
        digest.update(f"{image_id}:{int(label)}\n".encode())
    return digest.hexdigest()


def budget_exceeded(run_id: str, n_new: int, remaining: int, budget: int | None,
                    ) -> BudgetExceeded:
    return BudgetExceeded(
        f"run {run_id!r}: this query needs {n_new} new labels but only {remaining} of the "
        f"budget of {budget} remain; nothing was revealed. Ask for fewer ids or raise the "
        "budget with a new run id.")


def validate_ids(ids: Iterable[int], n_images: int) -> list[int]:
    values = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
    out = []
    for value in values:
        if isinstance(value, np.integer):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"image ids must be integers, got {value!r} ({type(value).__name__})")
        if not 0 <= value < n_images:
            raise ValueError(f"image id {value} is out of range: ids are 0..{n_images - 1}")
        out.append(value)
    if len(set(out)) != len(out):
        seen: set[int] = set()
        dupes = sorted({v for v in out if v in seen or seen.add(v)})
        raise ValueError(f"image ids repeated within one query: {dupes[:10]}; pass each id once")
    return out
