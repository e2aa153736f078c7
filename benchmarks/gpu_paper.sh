#!/usr/bin/env bash
# The paper's GPU-scale settings at full scale, as one prepared script (at most 8 minutes).
#
# What it runs (each stage resumes; see benchmarks/paper.py):
#   mnist-resnet50 --scale gpu: full MNIST (60k/10k), ResNet-50, 2 epochs, 12 checkpoints,
#   explain on 2000 samples, fine-tuning with 5 strategies x 5 seeds, a second run with
#   another data order, and the comparison. Measured on one H100 (2026-11-27): 2 min 12 s,
#   with the fine-tuning refused for want of uncertain prototypes (benchmarks/RESULTS.md);
#   25 fine-tuning epochs would add about 6 min at the 15 s per epoch measured there.
# Pass other settings as arguments, e.g. `benchmarks/gpu_paper.sh cifar10-resnet50`; each
# needs its own call (and its own data copy), as the 8-minute budget fits about one.
#
# Data: the real datasets live in ../shared/data beside a developer checkout, which does not
# travel to a device machine. Before calling, copy what the setting needs into an ignored
# folder of the repo and carry it:
#   echo /.gpu-data/ >> .git/info/exclude; mkdir -p .gpu-data
#   cp ../shared/data/mnist.npz .gpu-data/          # MNIST settings (11 MB)
#   cp ../shared/data/cifar10-jpg.zip .gpu-data/    # CIFAR-10 only (62 MiB: carry it alone)
# and run (device tool): command "bash benchmarks/gpu_paper.sh", carry [".gpu-data"].
# Results come back in $OUT (results JSON/Markdown and the log), if $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WHYLOOK_PROGRESS=0
[[ -f .gpu-data/mnist.npz ]] && export WHYLOOK_MNIST_NPZ="$PWD/.gpu-data/mnist.npz"
[[ -f .gpu-data/cifar10-jpg.zip ]] && export WHYLOOK_CIFAR_ZIP="$PWD/.gpu-data/cifar10-jpg.zip"
PY=${PYTHON:-python3}
BUDGET=${BUDGET_S:-470}   # seconds for all settings together: 8 minutes, less start-up
mkdir -p "${OUT:-/tmp}"

"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
EOF

settings=("$@")
[[ ${#settings[@]} -eq 0 ]] && settings=(mnist-resnet50)
start=$(date +%s)
status=0
for s in "${settings[@]}"; do
  # Three fine-tuning seeds first, so that a cut run still leaves a whole table (runs A and B,
  # the comparison); the second call reuses all of it and adds seeds 3 and 4.
  for n in 3 5; do
    left=$(( BUDGET - ($(date +%s) - start) ))
    if (( left < 60 )); then echo "skipping $s with $n seeds: only ${left}s left"; break; fi
    echo "== $s (gpu scale, $n seeds), ${left}s left"
    timeout --signal=INT "$left" "$PY" benchmarks/paper.py "$s" --scale gpu --device cuda \
      --seeds "$n" 2>&1 | tee -a "${OUT:-/tmp}/gpu_paper.log" || status=$?
  done
done
if [[ -n "${OUT:-}" ]]; then
  cp benchmarks/results/*-gpu.json benchmarks/results/*-gpu.md "$OUT"/ 2>/dev/null || true
fi
exit "$status"
