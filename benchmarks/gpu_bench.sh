#!/usr/bin/env bash
# The analysis-performance benchmark (benchmarks/bench_analysis.py) for resnet50 on one GPU,
# as one prepared command of at most 8 minutes. Measured on one H100 (2026-11-27): training
# 41 s, saliency ~60 s, explain ~20 s, scaling ~55 s, memory ~50 s (BUDGET_S / BENCH_S cap it).
#
# What it runs, in order, each step bounded so the whole stays under the budget:
#   1. train resnet50 on full MNIST (1 epoch, 24 checkpoints) into $RUNS (~1-2 min on an
#      H100; skipped when a finished run is already there),
#   2. bench_analysis.py --model resnet50 --device cuda: the saliency stage against Captum,
#      grad-cam and the floor (12 checkpoints x 1000 samples), explain end to end by stage
#      against the floor (n = 2000), the prototype-stage memory at 10k / 60k images and the
#      n / T scaling (~4-5 min),
#   3. the same saliency section with whylook's NHWC layout forced on (--whylook-layout
#      nhwc), since its automatic choice leaves NHWC off on GPUs until measured there, and
#      with precision="bfloat16" beside it (--precision bfloat16: whylook, the floor and
#      Captum in bfloat16; not yet run on a GPU) (~1-2 min).
#
# Data: MNIST lives in ../shared/data beside a developer checkout, which does not travel to a
# device machine. Copy it into an ignored folder of the repo and carry that folder:
#   echo /.gpu-data/ >> .git/info/exclude; mkdir -p .gpu-data
#   cp ../shared/data/mnist.npz .gpu-data/
# then run (device tool): command "bash benchmarks/gpu_bench.sh", carry [".gpu-data"].
# Without the copy it falls back to mnist5k (5k images: the 60k memory point is skipped).
# The results (JSON + Markdown tables + the log) are copied to $OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")/.."

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WHYLOOK_PROGRESS=0
PY=${PYTHON:-python3}
RUNS=${RUNS:-/tmp/whylook-bench-runs}
LOG="${OUT:-/tmp}/gpu_bench.log"
DATA="mnist5k"
[[ -f .gpu-data/mnist.npz ]] && DATA="npz:$PWD/.gpu-data/mnist.npz"
THREADS=$(nproc)
start=$(date +%s)

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF
"$PY" -c "import captum, pytorch_grad_cam" 2>/dev/null \
  || "$PY" -m pip install --quiet "captum>=0.7" "grad-cam>=1.5" 2>&1 | tail -2 | tee -a "$LOG" \
  || echo "captum / grad-cam unavailable: those rows will be skipped" | tee -a "$LOG"

status=0
BUDGET=${BUDGET_S:-470}   # seconds for the whole script
# Steps 1 + 2 (training happens inside, once). 390 s leaves room for step 3 and copying.
timeout --signal=INT "${BENCH_S:-390}" "$PY" benchmarks/bench_analysis.py --model resnet50 --device cuda \
  --data "$DATA" --threads "$THREADS" --runs-dir "$RUNS" \
  --out benchmarks/results/analysis-resnet50-cuda.json 2>&1 | tee -a "$LOG" || status=$?

left=$(( BUDGET - ($(date +%s) - start) ))
if (( left > 45 )); then
  # Step 3: the saliency section with NHWC forced on for whylook.
  timeout --signal=INT "$left" "$PY" benchmarks/bench_analysis.py --whylook-layout nhwc \
    --model resnet50 --device cuda --data "$DATA" --threads "$THREADS" --runs-dir "$RUNS" \
    --only saliency --precision bfloat16 \
    --out benchmarks/results/analysis-resnet50-cuda-nhwc.json 2>&1 \
    | tee -a "$LOG" || status=$?
else
  echo "skipping the NHWC saliency rerun: ${left}s left" | tee -a "$LOG"
fi

if [[ -n "${OUT:-}" ]]; then
  cp benchmarks/results/analysis-resnet50-cuda*.json benchmarks/results/analysis-resnet50-cuda*.md \
    "$OUT"/ 2>/dev/null || true
fi
echo "gpu_bench.sh: $(( $(date +%s) - start )) s, status $status" | tee -a "$LOG"
exit "$status"
