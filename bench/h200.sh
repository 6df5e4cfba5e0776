#!/bin/bash
# Runs the GPU benchmark on the offline H200 (from the repo root, with .whl/ from ../shared/gpu/fetch_wheels.sh).
#   bash bench/h200.sh issue7 ROWS   # models (8b, 1b), the issue-7 trainer check on 1b, then table ROWS on 8b
#   bash bench/h200.sh table ROWS    # models (8b), then table ROWS on 8b
#   bash bench/h200.sh plan ROWS     # the shapes and data ROWS name (smallest first), then plan-table ROWS
#   bash bench/h200.sh restart ROWS  # per row: its model, then SIGTERM, interrupt checkpoint, resume; model removed
# ROWS for issue7/table: rows of bench/gpu_bench.py (e.g. unsloth-1x4,unsloth-8x1,hf-1x4,lean,lean-24g,fast);
# for plan: SHAPE:SEQ:BUDGET[:PROFILE],... (e.g. 8b:16384:24,qwen7b:8192:48,qwen1.5b:2048:80).
# Everything must end inside the device tool's 10 minutes: BUDGET (seconds, default 570) bounds the whole script
# and the tables skip rows that no longer fit. TABLE_ARGS / PLAN_ARGS / RESTART_ARGS add flags to table /
# plan-table / restart (e.g. PLAN_ARGS="--warmup 3 --timed 5 --row-timeout 150"); SAMPLE=1 records where each
# trainer's start-up goes.
# Results land in $OUT (at most 8 files come back: the table JSON and markdown, issue7.json, and one tarball of
# all logs).
set -uo pipefail
phase=${1:?phase: issue7, table or plan}
case "$phase" in
  issue7|table) rows=${2:-unsloth-1x4,unsloth-8x1,hf-1x4,lean,lean-24g,fast} ;;
  plan) rows=${2:-qwen1.5b:2048:80,8b:16384:24,qwen7b:8192:48,8b:2048:24,qwen7b:2048:80,8b:8192:48} ;;
  restart) rows=${2:-8b:2048:48:lean} ;;
  *) echo "unknown phase $phase (issue7, table, plan or restart)" >&2; exit 2 ;;
esac
budget=${BUDGET:-570}
OUT=${OUT:-/tmp/bench-out}
res=/tmp/bench-results
mkdir -p "$OUT" "$res"
trap 'cp -f $res/*.json $res/*.md "$OUT"/ 2>/dev/null; tar czf "$OUT/logs.tgz" -C $res . 2>/dev/null' EXIT

PYTHONSAFEPATH=1 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
# The repo as the kubesloth package (api/ -> kubesloth.api, trainer/ -> kubesloth.trainer), without installing.
shim=/tmp/shim/kubesloth
mkdir -p $shim
for f in kubesloth/*; do ln -sfn "$PWD/$f" $shim/; done
for d in api trainer operator planner; do ln -sfn "$PWD/$d" $shim/$d; done
# Never the repo root itself on sys.path: its operator/ would shadow the standard library's operator module.
export PYTHONSAFEPATH=1 PYTHONPATH=/tmp/shim:/tmp/site
# SAMPLE=1: each trainer's main-thread stack every 10 ms into logs.tgz (samples/; bench/startup_sampler,
# read with bench/startup_report.py): where its start-up time goes.
if [ "${SAMPLE:-0}" = 1 ]; then
  mkdir -p $res/samples
  export PYTHONPATH=$PWD/bench/startup_sampler:$PYTHONPATH KUBESLOTH_BENCH_SAMPLE=$res/samples/trainer
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# Bytecode as the trainer image has it (pip compiles every package at build): here the first process writes it
# under a prefix that covers the H200 image's own packages too, and later processes read it. Before run 7 every
# process compiled its imports from source (the H200's environment writes no bytecode).
echo "bytecode: dont_write=$(python3 -c 'import sys; print(sys.dont_write_bytecode)') PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}"
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=/tmp/pycache
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee $res/gpu.txt
# The package set against requirements/trainer.lock (hack/check_lock.py): what .whl/ installed, and the image's
# transformers, must be the lock's versions; torch and triton come from the H200's image (2.11.0+cu130 / 3.6.0 where
# the lock has the trainer image's CUDA build): printed and recorded in versions.json, not failed (docs/benchmarks.md).
python3 hack/check_lock.py --require "$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | paste -sd, -),transformers" \
  --known-differ torch,triton --json $res/versions.json || exit 1
python3 -c "import kubesloth.trainer.engines.fused" || exit 1
echo "setup: ${SECONDS}s"

models=/tmp/models
if [ "$phase" = restart ]; then
  # Each row's model is built just before it and removed after it (--build-models): 8b and qwen7b rows in one
  # call would not fit the disk beside a 30 GB checkpoint otherwise.
  left=$((budget - SECONDS))
  python3 bench/gpu_bench.py restart --models $models --build-models --rows "$rows" --out $res \
    --cache /tmp/cache-restart --work /tmp/bench-work --budget $((left - 10)) ${RESTART_ARGS:-} 2>&1 \
    | tee $res/restart-table.out
  exit 0
fi
if [ "$phase" = plan ]; then
  # Only what the rows name: data for their sequence lengths, then their shapes, smallest first (disk: 64 GiB;
  # 8b 16 GB + qwen7b 15 GB + qwen1.5b 3 GB fit, nothing else big).
  python3 bench/gpu_bench.py models --out $models --rows "$rows" 2>&1 | tee $res/models.log | grep bench
  df -h /tmp | tail -1 | tee -a $res/models.log
  left=$((budget - SECONDS))
  echo "plan-table: ${left}s left for rows $rows"
  python3 bench/gpu_bench.py plan-table --models $models --rows "$rows" --out $res --cache /tmp/cache-plan \
    --work /tmp/bench-work --budget $((left - 10)) ${PLAN_ARGS:-} 2>&1 | tee $res/plan-table.out
  exit 0
fi
if [ "$phase" = issue7 ]; then
  python3 bench/gpu_bench.py models --out $models --shapes 8b,1b 2>&1 | tee $res/models.log | grep bench
  python3 bench/gpu_bench.py issue7 --models $models --out $res --cache /tmp/cache-1b 2>&1 | tee $res/issue7.out
else
  # Where the start-up time goes: a cold `import unsloth`, per module (beside the model build).
  (cd /tmp && python3 -X importtime -c "import unsloth" 2>$res/importtime.txt >/dev/null) &
  python3 bench/gpu_bench.py models --out $models --shapes 8b 2>&1 | tee $res/models.log | grep bench
  wait
fi
left=$((budget - SECONDS))
echo "table: ${left}s left for rows $rows"
python3 bench/gpu_bench.py table --models $models --shape 8b --rows "$rows" --out $res --cache /tmp/cache-8b \
  --budget $((left - 10)) ${TABLE_ARGS:-} 2>&1 | tee $res/table.out
