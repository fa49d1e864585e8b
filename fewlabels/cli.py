"""Command line: ``fewlabels {data,oracle,pretrain,finetune,active,probe,curve,search,report}``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


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


def _oracle_init(args: argparse.Namespace) -> int:
    from fewlabels.oracle import init_database

    path, count, version = init_database(args.db)
    print(f"label database {path}: {count} labels, the official ones; schema version {version}")
    return 0


def _oracle_export(args: argparse.Namespace) -> int:
    from fewlabels.files import write_json_atomic
    from fewlabels.oracle.database import export_ledger

    ledger = export_ledger(args.db)
    write_json_atomic(args.out, ledger)
    print(f"wrote {args.out}: {len(ledger['runs'])} runs, {len(ledger['queries'])} labels "
          "revealed (the record, not the labels)")
    return 0


def _oracle_import(args: argparse.Namespace) -> int:
    import json

    from fewlabels.oracle.database import import_ledger

    try:
        ledger = json.loads(Path(args.file).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{args.file} cannot be read as a ledger ({err}): make it with "
                         "'fewlabels oracle export'") from err
    runs, queries = import_ledger(ledger, args.db)
    print(f"imported {runs} runs and {queries} query rows (rows already there kept)")
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    from fewlabels.data.fashion_mnist import prepare
    from fewlabels.oracle import ensure_database

    prepare(args.dir)
    print(f"Fashion-MNIST verified and cached; label database at {ensure_database()}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fewlabels.semisup.report import report

    report(args.results)
    return 0


def _hydra_command(stage: str, function: str, device_preset: bool = False,
                   ) -> Callable[[argparse.Namespace], int]:
    """A command whose arguments are Hydra overrides of ``configs/<stage>``; ``function`` is
    ``module:name`` inside the package, imported only when the command runs."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        from fewlabels.config import compose

        overrides = list(args.overrides)
        if device_preset and not any(o.startswith("preset=") for o in overrides):
            import torch

            overrides.append("preset=" + ("gpu" if torch.cuda.is_available() else "cpu"))
        module, name = function.split(":")
        getattr(importlib.import_module(f"fewlabels.{module}"), name)(compose(stage, overrides))
        return 0

    return run


# command -> (what it does, an example of its overrides, the function it runs)
HYDRA_COMMANDS: dict[str, tuple[str, str, Callable[[argparse.Namespace], int]]] = {
    "pretrain": ("self-supervised pretraining (Hydra overrides)",
                 "e.g. method=byol preset=tiny trainer.max_epochs=2",
                 _hydra_command("pretrain", "ssl.train:pretrain", device_preset=True)),
    "finetune": ("fine-tune backbone + head on N queried labels and the unlabeled pool",
                 "e.g. n=250 algorithm=fixmatch strategy=typiclust preset=tiny",
                 _hydra_command("finetune", "semisup.run:finetune", device_preset=True)),
    "active": ("rounds of label queries where the fine-tuned model is unsure; the curve",
               "e.g. budgets=[20,40,100] algorithm=supervised select=margin preset=tiny",
               _hydra_command("active", "active.run:active", device_preset=True)),
    "evaluate": ("saved active runs' final models on the test set with test-time views",
                 "e.g. runs=[checkpoints/finetuned/active-<run>-seed0] views=flip",
                 _hydra_command("evaluate", "active.evaluate_saved:evaluate_saved")),
    "probe": ("spend N label queries, fit probes, report test accuracy",
              "e.g. n=100 strategy=typiclust seeds=3", _hydra_command("probe", "probe.run:probe")),
    "curve": ("test accuracy against label queries over a grid of N", "e.g. seeds=3 probe=linear",
              _hydra_command("probe", "probe.run:curve")),
    "search": ("smallest N whose mean test accuracy passes a target",
               "e.g. search.target=0.9 strategy=typiclust",
               _hydra_command("probe", "probe.run:search")),
}


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
    ini = osub.add_parser("init", help="build the label database (idempotent) and check its "
                          "labels against the official file")
    ini.add_argument("--db", default=None, help="database URL (default: $FEWLABELS_LABEL_DB)")
    ini.set_defaults(func=_oracle_init)
    exp = osub.add_parser("export", help="write the ledger (runs and queries, not the labels) "
                          "as JSON, to back it up or move it to another database")
    exp.add_argument("--db", default=None, help="database URL (default: $FEWLABELS_LABEL_DB)")
    exp.add_argument("--out", required=True, help="the JSON file to write")
    exp.set_defaults(func=_oracle_export)
    imp = osub.add_parser("import", help="add an exported ledger to a database (idempotent)")
    imp.add_argument("file", help="a file written by 'fewlabels oracle export'")
    imp.add_argument("--db", default=None, help="database URL (default: $FEWLABELS_LABEL_DB)")
    imp.set_defaults(func=_oracle_import)

    p = sub.add_parser("report", help="fine-tuning results as a markdown table")
    p.add_argument("--results", default="results", help="folder of finetune-*.json")
    p.set_defaults(func=_report)

    for name, (text, example, func) in HYDRA_COMMANDS.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("overrides", nargs="*", help=example)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fewlabels.config import ConfigError
    from fewlabels.data import DataFileError
    from fewlabels.models import CheckpointError
    from fewlabels.oracle import BudgetExceeded, LabelDatabaseError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, DataFileError, LabelDatabaseError, BudgetExceeded,
            ValueError,
            FileNotFoundError) as err:
        print(f"fewlabels {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
