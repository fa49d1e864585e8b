"""Command line: ``fewlabels {data,oracle,pretrain,probe,curve,search}``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def _pretrain(args: argparse.Namespace) -> int:
    import torch

    from fewlabels.config import compose
    from fewlabels.ssl.train import pretrain

    overrides = list(args.overrides)
    if not any(o.startswith("preset=") for o in overrides):
        overrides.append("preset=" + ("gpu" if torch.cuda.is_available() else "cpu"))
    pretrain(compose("pretrain", overrides))
    return 0


def _oracle_stats(args: argparse.Namespace) -> int:
    from fewlabels.oracle import stats

    rows = stats(args.db, args.run)
    print(f"{'run_id':<48} {'budget':>8} {'revealed':>9} {'used':>7}")
    for r in rows:
        used = f"{r.labels_revealed / r.budget:.0%}" if r.budget else "-"
        print(f"{r.run_id:<48} {r.budget if r.budget is not None else '-':>8} "
              f"{r.labels_revealed:>9} {used:>7}")
    print(f"{len(rows)} runs, {sum(r.labels_revealed for r in rows)} labels revealed in all")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from fewlabels.data.fashion_mnist import prepare
    from fewlabels.oracle import ensure_database

    prepare(args.dir)
    print(f"Fashion-MNIST verified and cached; label database at {ensure_database()}")
    return 0


def _probe_command(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from fewlabels.config import compose
        from fewlabels.probe import run as probe_run

        getattr(probe_run, name)(compose("probe", list(args.overrides)))
        return 0
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewlabels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="dataset commands")
    dsub = p.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser("prepare", help="locate or download, verify and cache the IDX files")
    prep.add_argument("--dir", default=None, help="folder holding the official .gz files")
    prep.set_defaults(func=_data_prepare)

    p = sub.add_parser("oracle", help="label database commands")
    osub = p.add_subparsers(dest="oracle_command", required=True)
    st = osub.add_parser("stats", help="labels revealed per run")
    st.add_argument("--run", default=None, help="only this run id")
    st.add_argument("--db", default=None, help="database URL (default: $FEWLABELS_LABEL_DB)")
    st.set_defaults(func=_oracle_stats)

    p = sub.add_parser("pretrain", help="self-supervised pretraining (Hydra overrides)")
    p.add_argument("overrides", nargs="*", help="e.g. method=byol preset=tiny trainer.max_epochs=2")
    p.set_defaults(func=_pretrain)

    for name, text in (("probe", "spend N label queries, fit probes, report test accuracy"),
                       ("curve", "test accuracy against label queries over a grid of N"),
                       ("search", "smallest N whose mean test accuracy passes a target")):
        p = sub.add_parser(name, help=text)
        p.add_argument("overrides", nargs="*", help="e.g. n=100 strategy=typiclust seeds=3")
        p.set_defaults(func=_probe_command(name))
    return parser


def main(argv: list[str] | None = None) -> int:
    from fewlabels.config import ConfigError
    from fewlabels.data import DataFileError
    from fewlabels.oracle import BudgetExceeded, LabelDatabaseError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataFileError, LabelDatabaseError, BudgetExceeded, ValueError,
            FileNotFoundError) as err:
        print(f"fewlabels {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
