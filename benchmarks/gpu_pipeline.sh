#!/usr/bin/env bash
# End-to-end pipeline on a GPU machine: the real CMU-1 region and a 4x4 mosaic of it.
# Usage: benchmarks/gpu_pipeline.sh SLIDE OUT_DIR [WORKERS]
set -euo pipefail
slide=$1; out=$2; workers=${3:-12}
mkdir -p "$out"
python3 benchmarks/make_mosaic_slide.py "$slide" /tmp/mosaic.svs --repeat 4
for target in "$slide" /tmp/mosaic.svs; do
  stem=$(basename "$target"); stem=${stem%%.*}
  /usr/bin/time -v python3 -m wsi_grunet.cli run "$target" --out /tmp/gpu-results --device cuda \
      --batch-size 8 --workers "$workers" --quiet 2> "$out/time_$stem.txt" | tee "$out/summary_$stem.txt"
  cp "/tmp/gpu-results/$stem/report.json" "$out/report_$stem.json"
done
nvidia-smi --query-gpu=name,memory.used --format=csv > "$out/gpu.txt"
