"""``probe``, ``curve`` and ``search``: select -> query -> fit -> evaluate, per seed, logged to W&B.

Each seed is one replicate with its own oracle run id
(``<tag><checkpoint>-<sha256[:8]>/<strategy>/n<N>/seed<S>``): asking again under the same id
costs nothing, and a checkpoint trained again under the same name buys its own queries.
"""

from __future__ import annotations

import csv
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from fewlabels.data import load_test_set, load_train_images
from fewlabels.evaluate import evaluate, mean_std
from fewlabels.files import atomic_path, write_json_atomic
from fewlabels.models.checkpoint import Checkpoint, newest_checkpoint, open_checkpoint
from fewlabels.names import safe_name
from fewlabels.oracle import Oracle, distinct_ids_revealed
from fewlabels.probe.features import features
from fewlabels.probe.fit import (
    KNNProbe,
    LabelPropagationProbe,
    LinearProbe,
    knn_graph,
    top_k,
    unit_features,
)
from fewlabels.probe.select import check_strategy, select
from fewlabels.tracking import init_run

PROBES = ("linear", "knn", "labelprop")


@dataclass(frozen=True)
class Embedded:
    """Unit features of the unlabeled training images and of the test images."""

    ckpt: Checkpoint
    train: np.ndarray
    test: np.ndarray
    _test_neighbours: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _graphs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def test_neighbours(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each test image's ``k`` most similar training images (labels play no part)."""
        if k not in self._test_neighbours:
            self._test_neighbours[k] = top_k(self.test, self.train, k)
        return self._test_neighbours[k]

    def graph(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """kNN graph of the training features: built once, cached beside the features and
        kept in memory for every seed and N of this process."""
        if k in self._graphs:
            return self._graphs[k]
        name = f"{self.ckpt.sha256[:20]}-{len(self.train)}-knn{k}.npz"
        path = self.ckpt.folder / "features" / name
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as saved:
                    self._graphs[k] = saved["neighbours"], saved["sims"]
                return self._graphs[k]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
                pass  # a truncated or damaged cache is built again and replaced below
        self._graphs[k] = knn_graph(self.train, k)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, neighbours=self._graphs[k][0], sims=self._graphs[k][1])
        return self._graphs[k]


def _whole_numbers(**values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{key}={value!r}: must be a whole number >= 0")


def validate(cfg: DictConfig, ns: list[int], strategies: list[str], probe: str) -> None:
    """Every argument checked before any work is done or any row written."""
    safe_name(cfg.run_tag, "run_tag", allow_empty=True)
    _whole_numbers(seeds=cfg.seeds, first_seed=cfg.first_seed)
    for n in ns:
        _whole_numbers(n=n)
    if cfg.seeds < 1:
        raise ValueError(f"seeds={cfg.seeds}: must be at least 1")
    n_pool = len(load_train_images().ids[: cfg.pool_limit])
    for n in ns:
        if not 1 <= n <= n_pool:
            raise ValueError(f"n={n}: choose between 1 and {n_pool} labels")
    for strategy in strategies:
        check_strategy(strategy)
    probe_names(probe)
    if cfg.learner:
        from fewlabels.semisup import ALGORITHMS

        if cfg.learner not in ALGORITHMS:
            raise ValueError(f"learner={cfg.learner!r}: use one of {', '.join(ALGORITHMS)} "
                             "(or null for the frozen probes)")


def embedded(cfg: DictConfig) -> Embedded:
    ckpt = open_checkpoint(cfg.checkpoint or newest_checkpoint(cfg.checkpoint_dir))
    train_images = load_train_images().images[: cfg.pool_limit]
    train, test = features(ckpt, train_images, load_test_set().images, cfg.feature_batch_size,
                           cfg.device)
    return Embedded(ckpt, *unit_features(train, test))


def probe_names(choice: str) -> tuple[str, ...]:
    if choice == "all":
        return PROBES
    if choice not in PROBES:
        raise ValueError(f"probe={choice!r}: use one of {', '.join(PROBES)} or 'all'")
    return (choice,)


def make_probe(name: str, cfg: DictConfig, emb: Embedded) -> LinearProbe | KNNProbe:
    if name == "linear":
        return LinearProbe(C=cfg.linear.C, max_iter=cfg.linear.max_iter)
    if name == "knn":
        return KNNProbe(k=cfg.knn.k, temperature=cfg.knn.temperature)
    lp = cfg.labelprop
    return LabelPropagationProbe(k=cfg.knn.k, temperature=cfg.knn.temperature,
                                 graph_k=lp.graph_k, alpha=lp.alpha, gamma=lp.gamma,
                                 iterations=lp.iterations, graph=emb.graph(lp.graph_k),
                                 query_neighbours=emb.test_neighbours(min(cfg.knn.k,
                                                                          len(emb.train))))


def oracle_run_id(cfg: DictConfig, ckpt: Checkpoint, strategy: str, n: int, seed: int) -> str:
    return f"{cfg.run_tag}{ckpt.name}-{ckpt.sha256[:8]}/{strategy}/n{n}/seed{seed}"


def fit_predict(cfg: DictConfig, emb: Embedded, strategy: str, n: int, seed: int,
                probes: tuple[str, ...], oracle: Oracle) -> dict[str, np.ndarray]:
    """Select from features, query exactly those ids, fit each probe; test predictions only."""
    tc = cfg.typiclust
    ids = select(strategy, emb.train, n, seed, tc.neighbors, tc.minibatch_above, tc.max_clusters)
    labels = oracle.query(ids)
    return {name: make_probe(name, cfg, emb).fit(emb.train, ids, labels).predict(emb.test)
            for name in probes}


def run_seed(cfg: DictConfig, emb: Embedded, test_labels: np.ndarray, strategy: str, n: int,
             seed: int, probes: tuple[str, ...]) -> list[dict[str, Any]]:
    run_id = oracle_run_id(cfg, emb.ckpt, strategy, n, seed)
    started = time.time()
    with Oracle(run_id, budget=n, purpose="probe") as oracle:
        predictions = fit_predict(cfg, emb, strategy, n, seed, probes, oracle)
        n_queries = oracle.used
    rows = [{"checkpoint": str(emb.ckpt.folder), "checkpoint_sha256": emb.ckpt.sha256,
             "strategy": strategy, "probe": name, "n": n, "n_queries": n_queries, "seed": seed,
             "run_id": run_id, "seconds": round(time.time() - started, 2),
             **evaluate(pred, test_labels)} for name, pred in predictions.items()]
    write_json_atomic(Path(cfg.results_dir) / f"probe-{run_id.replace('/', '-')}.json", rows)
    _log_probe_run(cfg, emb.ckpt, run_id, rows)
    return rows


def _log_probe_run(cfg: DictConfig, ckpt: Checkpoint, run_id: str,
                   rows: list[dict[str, Any]]) -> None:
    run = init_run(cfg, group=ckpt.name, job_type="probe", name=run_id.replace("/", "-"))
    for row in rows:
        p = row["probe"]
        run.summary.update({f"{p}/test_accuracy": row["test_accuracy"],
                            **{f"{p}/class_{i}_accuracy": a
                               for i, a in enumerate(row["per_class_accuracy"])}})
    run.summary.update({"n": rows[0]["n"], "n_queries": rows[0]["n_queries"],
                        "strategy": rows[0]["strategy"], "seed": rows[0]["seed"],
                        "oracle_run_id": run_id})
    run.finish()


def _summary_row(n: int, strategy: str, name: str, seed_rows: list[dict[str, Any]],
                 run_id_key: str) -> dict[str, Any]:
    """One curve row from the per-seed results of one learner at one N."""
    accs = [float(r["test_accuracy"]) for r in seed_rows]
    mean, std = mean_std(accs)
    return {"n": n, "strategy": strategy, "probe": name, "seeds": len(seed_rows),
            "mean": mean, "std": std, "accuracies": accs,
            "queries": int(sum(r["n_queries"] for r in seed_rows)),
            "run_ids": [r[run_id_key] for r in seed_rows]}


def _finetuned_row(cfg: DictConfig, emb: Embedded, strategy: str, n: int) -> dict[str, Any]:
    """One N with ``cfg.learner``: the `fewlabels finetune` command's seeds, as a curve row."""
    from fewlabels.config import compose
    from fewlabels.semisup.run import finetune

    overrides = [f"n={n}", f"algorithm={cfg.learner}", f"strategy={strategy}",
                 f"seeds={cfg.seeds}", f"first_seed={cfg.first_seed}",
                 f"checkpoint={emb.ckpt.folder}", f"results_dir={cfg.results_dir}",
                 f"run_tag={cfg.run_tag}", f"logger.dir={cfg.logger.dir}",
                 f"checkpoint_dir={cfg.checkpoint_dir}"]
    if cfg.pool_limit is not None:
        overrides.append(f"pool_limit={cfg.pool_limit}")
    results = finetune(compose("finetune", [*overrides, *cfg.learner_args]))
    return _summary_row(n, strategy, cfg.learner, results, "oracle_run_id")


def evaluate_n(cfg: DictConfig, emb: Embedded, test_labels: np.ndarray, strategy: str, n: int,
               probes: tuple[str, ...]) -> list[dict[str, Any]]:
    """All seeds at one N; returns one summary row per probe (or the fine-tuned learner's)."""
    if cfg.learner:
        return [_finetuned_row(cfg, emb, strategy, n)]
    per_seed = [run_seed(cfg, emb, test_labels, strategy, n, cfg.first_seed + s, probes)
                for s in range(cfg.seeds)]
    return [_summary_row(n, strategy, name, [rows[i] for rows in per_seed], "run_id")
            for i, name in enumerate(probes)]


def _table(summary: list[dict[str, Any]]) -> str:
    lines = [f"{'N':>6}  {'strategy':<10} {'probe':<7} {'test accuracy':>22}  queries"]
    lines += [f"{r['n']:>6}  {r['strategy']:<10} {r['probe']:<7} "
              f"{r['mean']:>8.2%} ± {r['std']:.2%} ({r['seeds']} seeds)  {r['queries']:>7}"
              for r in summary]
    return "\n".join(lines)


def probe(cfg: DictConfig) -> list[dict[str, Any]]:
    validate(cfg, [cfg.n], [cfg.strategy], cfg.probe)
    emb = embedded(cfg)
    summary = evaluate_n(cfg, emb, load_test_set().labels, cfg.strategy, cfg.n,
                         probe_names(cfg.probe))
    print(f"checkpoint: {emb.ckpt.folder}\n{_table(summary)}")
    return summary


def curve(cfg: DictConfig) -> Path:
    validate(cfg, list(cfg.curve.ns), list(cfg.curve.strategies), cfg.probe)
    emb = embedded(cfg)
    test_labels = load_test_set().labels
    probes = (cfg.learner,) if cfg.learner else probe_names(cfg.probe)
    summary = [row for strategy in cfg.curve.strategies for n in cfg.curve.ns
               for row in evaluate_n(cfg, emb, test_labels, strategy, n, probes)]
    out = Path(cfg.results_dir) / f"curve-{cfg.run_tag}{emb.ckpt.name}"
    with atomic_path(out.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as f:
        fields = ["n", "strategy", "probe", "seeds", "mean", "std", "queries"]
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(summary)
    _plot(summary, out.with_suffix(".png"), emb.ckpt.name, cfg.search.target)
    run = init_run(cfg, group=emb.ckpt.name, job_type="curve", name=f"curve-{emb.ckpt.name}")
    import wandb

    fields = ["n", "strategy", "probe", "seeds", "mean", "std", "queries"]
    run.log({"curve/table": wandb.Table(columns=fields,
                                        data=[[r[k] for k in fields] for r in summary]),
             "curve/plot": wandb.Image(str(out.with_suffix(".png")))})
    run.finish()
    print(f"{_table(summary)}\nwrote {out}.csv and {out}.png")
    return out


def _plot(summary: list[dict[str, Any]], path: Path, title: str, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["strategy"], r["probe"]) for r in summary}):
        rows = sorted((r for r in summary if (r["strategy"], r["probe"]) == key),
                      key=lambda r: r["n"])
        ax.errorbar([r["n"] for r in rows], [r["mean"] for r in rows],
                    yerr=[r["std"] for r in rows], marker="o", capsize=3, label=" / ".join(key))
    ax.axhline(target, color="gray", linestyle="--", label=f"{target:.0%}")
    ax.set(xscale="log", xlabel="labels queried (per seed)", ylabel="test accuracy",
           title=f"label efficiency: {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def search(cfg: DictConfig) -> dict[str, Any]:
    """Coarse grid, then bisection between the last failing and the first passing N.

    Assumes accuracy grows with N between those two points (not guaranteed, and not checked).
    """
    validate(cfg, list(cfg.search.grid), [cfg.strategy], cfg.search.probe)
    emb = embedded(cfg)
    test_labels = load_test_set().labels
    probes = (cfg.learner,) if cfg.learner else probe_names(cfg.search.probe)
    target, strategy = cfg.search.target, cfg.strategy
    tried: dict[int, dict[str, Any]] = {}

    def passes(n: int) -> bool:
        tried[n] = evaluate_n(cfg, emb, test_labels, strategy, n, probes)[0]
        print(f"  N={n:>6}: {tried[n]['mean']:.2%} ± {tried[n]['std']:.2%}", flush=True)
        return tried[n]["mean"] > target

    grid = sorted(cfg.search.grid)
    first_pass = next((n for n in grid if passes(n)), None)
    if first_pass is not None:
        lo = max((n for n in tried if n < first_pass), default=0)
        hi = first_pass
        while hi - lo > cfg.search.resolution:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if passes(mid) else (mid, hi)
        first_pass = hi
    run_ids = [rid for row in tried.values() for rid in row["run_ids"]]
    result = {"checkpoint": str(emb.ckpt.folder), "strategy": strategy, "probe": probes[0],
              "target": target, "smallest_n": first_pass, "seeds": cfg.seeds,
              "tried": [tried[n] for n in sorted(tried)],
              "queries_recorded": sum(r["queries"] for r in tried.values()),
              "distinct_images_revealed": distinct_ids_revealed(run_ids)}
    out = Path(cfg.results_dir) / f"search-{cfg.run_tag}{emb.ckpt.name}-{strategy}-{probes[0]}.json"
    write_json_atomic(out, result)
    found = f"N={first_pass}" if first_pass else f"not reached by N={grid[-1]}"
    print(f"target {target:.0%} ({probes[0]} probe, {strategy}): {found}; "
          f"{result['queries_recorded']} queries recorded in the label database for this "
          f"search ({result['distinct_images_revealed']} distinct images). Wrote {out}")
    return result
