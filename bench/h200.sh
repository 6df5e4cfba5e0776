#!/bin/bash
# Runs the GPU benchmark on the offline H200 (from the repo root, with .whl/ from ../shared/gpu/fetch_wheels.sh).
#   bash bench/h200.sh issue7 ROWS   # models (8b, 1b), the issue-7 trainer check on 1b, then table ROWS on 8b
#   bash bench/h200.sh table ROWS    # models (8b), then table ROWS on 8b
# ROWS: comma-separated rows of bench/gpu_bench.py (e.g. unsloth-1x4,unsloth-8x1,hf-1x4,lean,lean-24g,fast).
# Everything must end inside the device tool's 10 minutes: BUDGET (seconds, default 570) bounds the whole script
# and the table skips rows that no longer fit. Results land in $OUT (at most 8 files come back: the table JSON
# and markdown, issue7.json, and one tarball of all logs).
set -uo pipefail
phase=${1:?phase: issue7 or table}
rows=${2:-unsloth-1x4,unsloth-8x1,hf-1x4,lean,lean-24g,fast}
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
for d in api trainer operator; do ln -sfn "$PWD/$d" $shim/$d; done
# Never the repo root itself on sys.path: its operator/ would shadow the standard library's operator module.
export PYTHONSAFEPATH=1 PYTHONPATH=/tmp/shim:/tmp/site
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee $res/gpu.txt
python3 -c "import kubesloth.trainer.engines.fused" || exit 1

models=/tmp/models
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
