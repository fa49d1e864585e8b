#!/usr/bin/env bash
# The GPU check (issue 3), in ONE device call. Here first: `make gpu-pack`; then call the device
# tool with run(command='bash scripts/gpu/run.sh', carry=['.devkit'], timeout_s=580).
#
#   1. install the carried wheels into /tmp/site; verify the carried data; build the label DB
#   2. benchmarks/bench_pretrain.py --preset gpu: (a) shipped step, (b) compute limit,
#      (c) per-image lightly transforms, side by side
#   3. fewlabels pretrain preset=gpu with trainer.time_budget=TRAIN_S: the preset's epochs, or
#      fewer when the budget comes first (the learning-rate schedule follows whichever ends the run)
#   4. fewlabels probe n=100 (random, 3 seeds, all probes), then more probes while time is left
#   5. fewlabels finetune (FixMatch, n=250, one seed, FT_STEPS steps) when FT_NEED_S are left
#
# Everything lands in $OUT as it is made, so a run cut short still returns what it did:
# log.txt, summary.json, results.tar.gz (results/, provenance, config, bench.json, W&B offline
# runs, a copy of the label database with every query made there) and the backbone in parts of
# <= 15 MiB (scripts/gpu/unpack.py joins and checks them here).
#
# Knobs (environment): TRAIN_S (default 330), BUDGET_S (whole script, default 540),
# METHOD (simclr), PRESET (gpu), PYTHON (python3), KIT (.devkit), BENCH_STEPS (60), FT_STEPS
# (2000), FT_NEED_S (120), EXTRA
# (more pretrain overrides), SKIP_WHEELS=1 (dependencies already installed, e.g. a dry run here).
set -uo pipefail
: "${OUT:?OUT must name the folder that comes back (the device tool sets it)}"
TRAIN_S=${TRAIN_S:-330}
BUDGET_S=${BUDGET_S:-540}
METHOD=${METHOD:-simclr}
PRESET=${PRESET:-gpu}
PYTHON=${PYTHON:-python3}
KIT=${KIT:-.devkit}
BENCH_STEPS=${BENCH_STEPS:-60}
FT_STEPS=${FT_STEPS:-2000}
FT_NEED_S=${FT_NEED_S:-120}
EXTRA=${EXTRA:-}
RUN=$METHOD-$PRESET-seed0
CKPT=checkpoints/$RUN
mkdir -p "$OUT" results
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 WANDB_MODE=${WANDB_MODE:-offline} FASHION_MNIST_DIR=$PWD/$KIT/data
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fl() { "$PYTHON" -m fewlabels.cli "$@"; }
left() { echo $((BUDGET_S - SECONDS)); }
stage() { echo; echo "=== [$(date -u +%T), ${SECONDS}s] $*"; }

pack() {  # everything small into one tarball; the backbone in parts (the tool returns <= 16 MiB)
    [ -f data/labels.sqlite ] && "$PYTHON" -c "import sqlite3
src, dst = sqlite3.connect('data/labels.sqlite'), sqlite3.connect('results/.labels-device.sqlite')
src.backup(dst); dst.close()" && mv results/.labels-device.sqlite results/labels-device.sqlite
    {   find results -type f  # plain files only: W&B leaves links to absolute paths
        [ -d wandb ] && find wandb -type f
        for f in "$CKPT"/{config.yaml,provenance.json,wandb_run_id}; do [ -f "$f" ] && echo "$f"; done
    } | tar czf "$OUT/.results.tar.gz" -T - && mv "$OUT/.results.tar.gz" "$OUT/results.tar.gz"
    if [ -f "$CKPT/backbone.safetensors" ] && [ ! -f "$OUT/backbone.sha256" ]; then
        split -b 15M -d "$CKPT/backbone.safetensors" "$OUT/backbone.safetensors.part-"
        (cd "$CKPT" && sha256sum backbone.safetensors) > "$OUT/backbone.sha256"
    fi
    "$PYTHON" scripts/gpu/summarize.py --out "$OUT/summary.json" --checkpoint "$CKPT" || true
}

stage "environment"
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$KIT"/whl/*.whl || { echo "installing the carried wheels failed"; exit 3; }
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" - <<'EOF' || { echo "an import failed: see above; fix .devkit (make gpu-pack)"; exit 3; }
import importlib
import torch
for name in ("torch", "torchvision", "pytorch_lightning", "lightly", "timm", "wandb", "hydra",
             "omegaconf", "safetensors", "sklearn", "fewlabels"):
    module = importlib.import_module(name)
    print(f"{name:18} {getattr(module, '__version__', '?')}")
print("cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
if [ "$WANDB_MODE" != disabled ]; then  # W&B must not cost the GPU numbers: fall back loudly
    "$PYTHON" - <<'EOF' || { echo "!!! W&B offline logging fails here: WANDB_MODE=disabled from now on"; export WANDB_MODE=disabled; }
import tempfile
import wandb
run = wandb.init(project="fewlabels-smoke", mode="offline", dir=tempfile.mkdtemp())
run.log({"ok": 1})
run.finish()
EOF
fi
[ -f "$KIT/manifest.json" ] && cp "$KIT/manifest.json" results/devkit-manifest.json
fl data prepare || exit 3

stage "bench-pretrain (preset=$PRESET, $BENCH_STEPS steps)"
"$PYTHON" benchmarks/bench_pretrain.py --preset "$PRESET" --method "$METHOD" \
    --steps "$BENCH_STEPS" --json results/bench-pretrain.json
pack

stage "pretrain $RUN (~${TRAIN_S}s of training)"
TIME_BUDGET=$(printf "00:00:%02d:%02d" $((TRAIN_S / 60)) $((TRAIN_S % 60)))
echo "= make pretrain PRESET=$PRESET METHOD=$METHOD ARGS=\"run_name=$RUN trainer.time_budget=$TIME_BUDGET $EXTRA\""
# shellcheck disable=SC2086  # EXTRA holds several overrides
fl pretrain method="$METHOD" preset="$PRESET" run_name="$RUN" trainer.time_budget="$TIME_BUDGET" $EXTRA
pack

probe() {  # strategy n: skipped when less time is left than the last probe took, plus margin
    local need=$((LAST_PROBE_S + 20))
    if [ "$(left)" -lt "$need" ]; then echo "skip probe $*: $(left)s left, ~${need}s needed"; return; fi
    stage "probe strategy=$1 n=$2 (= make probe N=$2 STRATEGY=$1 CKPT=$CKPT)"
    local started=$SECONDS
    fl probe checkpoint="$CKPT" strategy="$1" n="$2" probe=all seeds=3
    LAST_PROBE_S=$((SECONDS - started))
    pack
}
LAST_PROBE_S=60
if [ -f "$CKPT/backbone.safetensors" ]; then
    probe random 100
    probe typiclust 100
    probe typiclust 40
    probe random 40
fi
# A fine-tuning smoke run on the GPU (one seed, FT_STEPS steps): its images/s and that it runs
# there; one seed is no reportable accuracy. Skipped when less than FT_NEED_S is left.
if [ -f "$CKPT/backbone.safetensors" ] && [ "$(left)" -ge "$FT_NEED_S" ]; then
    stage "finetune fixmatch n=250 (= make finetune N=250 SEEDS=1 PRESET=$PRESET CKPT=$CKPT ARGS=\"trainer.steps=$FT_STEPS\")"
    fl finetune checkpoint="$CKPT" preset="$PRESET" algorithm=fixmatch n=250 seeds=1 \
        trainer.steps="$FT_STEPS" \
        trainer.max_time="$(printf "00:00:%02d:%02d" $((FT_NEED_S / 60)) $((FT_NEED_S % 60)))"
    pack
else
    echo "skip finetune: $(left)s left, ${FT_NEED_S}s needed"
fi
stage "done: $(left)s of BUDGET_S=$BUDGET_S left"
pack
ls -la "$OUT"
