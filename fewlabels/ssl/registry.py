"""Method registry: ``method.name`` in the config -> LightningModule class."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
METHODS: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    def add(cls: T) -> T:
        METHODS[name] = cls  # type: ignore[assignment]
        return cls
    return add


def method_class(name: str) -> type:
    import fewlabels.ssl.byol  # noqa: F401  (importing a method file registers it)
    import fewlabels.ssl.simclr  # noqa: F401

    if name not in METHODS:
        raise ValueError(f"method={name!r} is not registered; known: {sorted(METHODS)}. "
                         "Add a file in fewlabels/ssl/ and a YAML in configs/method/.")
    return METHODS[name]
