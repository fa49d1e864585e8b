"""One JSON of what a GPU check measured: the benchmark, the pretraining run's provenance and
the probe results of its checkpoint (mean and sample std over seeds), read from the files the
commands wrote. Usage: python scripts/gpu/summarize.py --checkpoint checkpoints/simclr-gpu-seed0
[--results results] [--out summary.json]"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from fewlabels.files import write_json_atomic


def probe_summary(results: Path, checkpoint: str) -> list[dict]:
    """Per (strategy, n, probe): accuracies of every seed run on this checkpoint."""
    groups: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for path in sorted(results.glob(f"probe-{checkpoint}-*.json")):
        for row in json.loads(path.read_text()):
            groups[row["strategy"], row["n"], row["probe"]].append(row)
    out = []
    for (strategy, n, probe), rows in sorted(groups.items()):
        accs = [r["test_accuracy"] for r in sorted(rows, key=lambda r: r["seed"])]
        out.append({"strategy": strategy, "n": n, "probe": probe, "seeds": len(accs),
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "accuracies": accs, "queries": sum(r["n_queries"] for r in rows)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    def read(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    summary = {"bench": read(args.results / "bench-pretrain.json"),
               "pretrain": read(args.checkpoint / "provenance.json"),
               "probes": probe_summary(args.results, args.checkpoint.name)}
    for row in summary["probes"]:
        print(f"{row['strategy']:>9} N={row['n']:<4} {row['probe']:<9} "
              f"{row['mean']:.2%} ± {row['std']:.2%} ({row['seeds']} seeds, "
              f"{row['queries']} queries)")
    if args.out:
        write_json_atomic(args.out, summary)


if __name__ == "__main__":
    main()
