#!/usr/bin/env bash
# glibc's malloc keeping freed memory, against its defaults, for the `whylook` program:
# `whylook train` (mnist5k, 2 epochs) and `whylook explain` (a copy of RUN's checkpoints,
# fresh cache), alternating, each in a fresh process. "kept" sets, through glibc's
# environment variables, a 1 GiB trim threshold (freed heap top stays in the process),
# a 64 MiB top pad and a 32 MiB mmap threshold (blocks up to glibc's 64-bit limit come
# from the heap and are reused). Wall and CPU time, minor page faults and peak RSS from
# /usr/bin/time.
#
#   OMP_NUM_THREADS=1 bash benchmarks/bench_alloc.sh RUN [REPEATS]
set -euo pipefail
run=${1:?usage: bench_alloc.sh RUN [REPEATS]}
repeats=${2:-4}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
fmt="%e s wall, %U s user, %S s sys, %R minor faults, %M KB peak"
kept=(env MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=67108864
      MALLOC_MMAP_THRESHOLD_=33554432)
for ((i = 1; i <= repeats; i++)); do
  for mode in default kept; do
    if [ "$mode" = default ]; then pre=(env); else pre=("${kept[@]}"); fi
    rm -rf "$work/train" "$work/explain"
    "${pre[@]}" /usr/bin/time -f "$mode train $fmt" whylook train --epochs 2 \
      --out "$work/train" >/dev/null
    mkdir "$work/explain" && cp -r "$run/checkpoints" "$run/run.json" "$work/explain/"
    "${pre[@]}" /usr/bin/time -f "$mode explain $fmt" whylook explain "$work/explain" >/dev/null
  done
done
