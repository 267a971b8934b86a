#!/usr/bin/env bash
# The GPU check of issue 15: analysis (all Hessians + Hutchinson traces + predicted errors), attention-aware GPTQ and
# evaluation at the papers' setting (128 × 2048 calibration tokens), on the embedded model and on a ~1.1 B-parameter
# LLaMA-architecture model with random weights (made here from a config: no hub), each stage in its own process,
# recording wall time, seconds per block, peak device memory (torch.cuda.max_memory_allocated), peak RSS.
#
#   device tool:  run(command="bash bench/gpu_check.sh", timeout_s=600)      # results come back from $OUT
#   by hand:      OUT=/tmp/gpu bash bench/gpu_check.sh
#
# Needs torch + transformers + safetensors + pandas + pyyaml only (no DuckDB, datasets or Streamlit: the path it runs
# imports none of them). The embedded model's converted weights (data/models/, 540 MB) exceed what the device tool
# carries (64 MiB), so where they are absent its architecture runs with random weights (same shapes, same cost);
# perplexities of random weights mean nothing, times and memory do. Budget: about 9 minutes on an H200.
# Sized by the first H200 run (bench/results/gpu_check.md): whole-model stages at 128 × 2048 did not finish in 60–120 s,
# so the analysis and quantization stages take two blocks each (seconds per block is the figure that scales) and
# the evaluation 16 windows, with and without the block-wise path.
set -uo pipefail
OUT=${OUT:-/tmp/aptq-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
RESULTS="$OUT/gpu_check.jsonl"
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
: > "$RESULTS"
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >> "$LOG" 2>&1

run_stage() {  # seconds model stage [extra args…]: one stage in its own process, its record appended to $RESULTS
  local limit=$1 model=$2 stage=$3; shift 3
  echo "== $(date -u +%T) $stage $model $*" >> "$LOG"
  timeout "$limit" $PY bench/bench_big_model.py stage "$stage" --model "$model" --device cuda --json "$RESULTS" "$@" \
    >> "$LOG" 2>&1 || echo "{\"stage\": \"$stage\", \"model\": \"$model\", \"failed\": $?}" >> "$RESULTS"
}

SMOL=embedded
if ! $PY -c "from aptq.models import resolve_source; resolve_source('')" >> "$LOG" 2>&1; then
  SMOL=/tmp/aptq-smollm2-shape
  $PY bench/bench_big_model.py make --out $SMOL --hidden 576 --layers 30 --heads 9 --kv-heads 3 \
    --intermediate 1536 --vocab 49152 >> "$LOG" 2>&1
fi
BIG=/tmp/aptq-llama-1b
$PY bench/bench_big_model.py make --out $BIG --hidden 2048 --layers 16 --heads 32 --kv-heads 8 \
  --intermediate 8192 --vocab 32000 >> "$LOG" 2>&1

PAPER="--samples 128 --seqlen 2048 --dtype bfloat16"
# Stage limits add up to 8.5 minutes (making the two models adds about one); a stage past its limit is recorded as
# failed and the next one runs.
run_stage 75 $SMOL analyze $PAPER --group 64 --max-blocks 2
run_stage 90 $SMOL quantize $PAPER --group 64 --max-blocks 2 --eval-windows 16
run_stage 40 $BIG eval $PAPER --eval-windows 16 --group 128
run_stage 50 $BIG eval $PAPER --eval-windows 16 --group 128 --blockwise
run_stage 110 $BIG quantize $PAPER --group 128 --max-blocks 2 --eval-windows 16
run_stage 75 $BIG analyze $PAPER --group 128 --max-blocks 2
# block refinement (docs/algorithms.md §18) on the device: 1 block, 100 steps (its time and peak memory)
run_stage 70 $BIG quantize $PAPER --group 128 --max-blocks 1 --block-refinement 100
echo "== $(date -u +%T) done" >> "$LOG"
cat "$RESULTS"
