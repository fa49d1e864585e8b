"""``fewlabels report``: the fine-tuning results in ``results/finetune-*.json`` as one markdown
table, a row per configuration — (run tag + checkpoint, algorithm, strategy, N, configured steps):
test accuracy mean ± std over the seeds found, the queries the label database counted, steps,
wall time. Runs of different configurations are never averaged together."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fewlabels.evaluate import mean_std
from fewlabels.runtime import wall_time_s


def rows(results_dir: str | Path) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(Path(results_dir).glob("finetune-*.json")):
        r = json.loads(path.read_text())
        tagged_ckpt = r["oracle_run_id"].split("/")[1]  # <run_tag><checkpoint>-<sha256[:8]>
        groups[(tagged_ckpt, r["algorithm"], r["strategy"], r["n"],
                r["steps_configured"])].append(r)
    out = []
    for (ckpt, algorithm, strategy, n, _), runs in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][3], kv[0][1], kv[0][2], kv[0][4])):
        mean, std = mean_std([r["test_accuracy"] for r in runs])
        out.append({"checkpoint": ckpt, "algorithm": algorithm, "strategy": strategy, "n": n,
                    "seeds": sorted(r["seed"] for r in runs), "mean": mean, "std": std,
                    "queries": sum(r["n_queries"] for r in runs),
                    "steps": sorted({r["steps"] for r in runs}),
                    "ended_by": sorted({r["ended_by"] for r in runs}),
                    "wall_min": float(np.mean([wall_time_s(r)
                                               for r in runs])) / 60})
    return out


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| checkpoint | algorithm | strategy | N | test accuracy, mean ± std | seeds | "
             "queries (all seeds) | steps | min per run |",
             "| --- | --- | --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for r in table:
        ended = "" if r["ended_by"] == ["steps"] else f" ({'/'.join(r['ended_by'])})"
        lines.append(f"| {r['checkpoint']} | {r['algorithm']} | {r['strategy']} | {r['n']} | "
                     f"{r['mean']:.2%} ± {r['std']:.2%} | {len(r['seeds'])} | {r['queries']} | "
                     f"{'/'.join(map(str, r['steps']))}{ended} | {r['wall_min']:.1f} |")
    return "\n".join(lines)


def report(results_dir: str | Path = "results") -> str:
    table = rows(results_dir)
    if not table:
        raise FileNotFoundError(f"no finetune-*.json under {results_dir}/: run 'make finetune'")
    text = markdown(table)
    print(text)
    return text
