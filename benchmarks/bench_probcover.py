"""ProbCover on the pretrained features: fewlabels' sparse, chunked implementation against
scikit-activeml's (``skactiveml.pool.ProbCover``, dense pairwise distances), on the same first
``--points`` training images, taking turns; seconds and peak memory (each run in its own process,
so its peak RSS is its own). scikit-activeml is not a dependency: install it into the venv
(``.venv/bin/pip install scikit-activeml``) or pass ``--only fewlabels``.

    make bench-probcover ARGS="--points 20000"
"""

from __future__ import annotations

import json
import subprocess
import sys

from turns import median, parser, take_turns

CHILD = """
import json, resource, sys, time
import numpy as np
from fewlabels.models import newest_checkpoint, open_checkpoint
from fewlabels.data import load_test_set, load_train_images
from fewlabels.probe.features import features
from fewlabels.probe.select import _unit, select_probcover
impl, points, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ckpt = open_checkpoint(sys.argv[4] or newest_checkpoint("checkpoints"))
train, _ = features(ckpt, load_train_images().images, load_test_set().images, 1024)
x = _unit(train[:points]).astype(np.float32)
start = time.perf_counter()
if impl == "fewlabels":
    ids = select_probcover(x, n, seed=0)
else:
    from skactiveml.pool import ProbCover
    from skactiveml.utils import MISSING_LABEL
    ids = ProbCover(n_classes=10, random_state=0).query(x, np.full(len(x), MISSING_LABEL),
                                                         batch_size=n)
print(json.dumps({"seconds": time.perf_counter() - start,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def measure(impl: str, points: int, n: int, ckpt: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", CHILD, impl, str(points), str(n), ckpt],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__, steps=0, repeats=3)
    p.add_argument("--points", type=int, default=20000, help="first training images used")
    p.add_argument("--n", type=int, default=100, help="ids to select")
    p.add_argument("--checkpoint", default="", help="checkpoints/<run> (default: the newest)")
    p.add_argument("--only", choices=["fewlabels", "skactiveml"], default=None)
    args = p.parse_args()
    impls = [args.only] if args.only else ["fewlabels", "skactiveml"]
    peaks: dict[str, list[float]] = {i: [] for i in impls}

    def run(impl: str) -> float:
        out = measure(impl, args.points, args.n, args.checkpoint)
        peaks[impl].append(out["peak_gb"])
        return out["seconds"]

    seconds = take_turns({i: (lambda i=i: run(i)) for i in impls}, args.repeats)
    for impl in impls:
        print(f"{impl:>10}: {median(seconds[impl]):7.1f} s (runs "
              f"{', '.join(f'{s:.1f}' for s in seconds[impl])}), peak RSS "
              f"{max(peaks[impl]):.2f} GB, {args.points} points, {args.n} picks")
    if len(impls) == 2:
        time_ratio = median(seconds["skactiveml"]) / median(seconds["fewlabels"])
        memory_ratio = max(peaks["skactiveml"]) / max(peaks["fewlabels"])
        print(f"skactiveml / fewlabels: {time_ratio:.1f}x the time, {memory_ratio:.1f}x the "
              "memory")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "peak_gb": peaks}, indent=2))


if __name__ == "__main__":
    main()
