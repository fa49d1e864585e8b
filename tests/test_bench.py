"""The benchmarks measure their variants taking turns, so machine noise hits them alike."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from turns import median, take_turns  # noqa: E402


def test_variants_take_turns_and_medians_are_compared():
    calls: list[str] = []

    def measure(name: str, value: float):
        def run() -> float:
            calls.append(name)
            return value + len(calls)
        return run

    runs = take_turns({"a": measure("a", 100.0), "b": measure("b", 200.0)}, repeats=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert runs == {"a": [101.0, 103.0, 105.0], "b": [202.0, 204.0, 206.0]}
    assert median(runs["a"]) == 103.0


def test_capacity_variants_scale_the_presets_backbone_and_bad_variants_are_explained():
    import pytest
    from bench_capacity import default_variants, parse_variant

    from fewlabels.config import compose

    variants = default_variants(compose("pretrain", ["preset=cpu"]).backbone)
    assert variants == {"base": (), "stride1-stem": ("backbone.stem_stride=1",),
                        "2x-widths": ("backbone.widths=[64,128,256,512]",),
                        "2x-blocks": ("backbone.blocks=[2,2,2,2]",)}
    assert parse_variant("wide=backbone.widths=[48,96],backbone.stem_stride=1") == (
        "wide", ("backbone.widths=[48,96]", "backbone.stem_stride=1"))
    with pytest.raises(SystemExit, match="NAME=OVERRIDE"):
        parse_variant("backbone.stem_stride")
