"""Names that become parts of paths (run names, run tags): one validation for every stage."""

from __future__ import annotations

import re

_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def safe_name(value: object, key: str, allow_empty: bool = False) -> str:
    """``value`` if it is one safe path component (letters, digits, ``.``, ``_``, ``-``, not
    starting with a dot or dash); else a ValueError that says what to pass instead."""
    text = "" if value is None else str(value)
    if (allow_empty and text == "") or (_SAFE.fullmatch(text) and len(text) <= 128):
        return text
    raise ValueError(f"{key}={value!r}: must be one plain name of at most 128 letters, digits, "
                     "'.', '_' or '-' (not starting with '.' or '-', no '/'), as it becomes part "
                     f"of a file or folder name; e.g. {key}=my-run-1")
