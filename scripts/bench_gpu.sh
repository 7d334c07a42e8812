#!/usr/bin/env bash
# GPU figures for issue "Paper scale": the Qwen2.5-VL-3B-class checkpoint (random weights, saved and loaded as a
# normal Hugging Face checkpoint) next to the small presets, bf16 and fp32, the expert eager and torch.compiled
# (CUDA graphs). Needs only python3 with torch + transformers (a GPU machine's image); writes rows to $OUT
# (default ./bench_gpu). Usage: bash scripts/bench_gpu.sh [REPEATS]
set -uo pipefail
OUT=${OUT:-bench_gpu}
mkdir -p "$OUT"
REPEATS=${1:-5}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/card.txt"
CKPT=${CKPT:-/tmp/spanvla_3b_class}
[ -d "$CKPT" ] || python3 -m spanvla_ros.cli.make_default --preset qwen2.5-vl-3b-class --device cuda --dtype bfloat16 --out "$CKPT" \
    || exit 1
bench() { python3 -m spanvla_ros.cli.bench_model --device cuda --repeats "$REPEATS" --reasoning-tokens 40 "$@"; }
bench --dtype bfloat16 --presets tiny qwen0.5b-class --checkpoints "$CKPT" --json "$OUT/cuda_bf16.json"
bench --dtype float32 --presets --checkpoints "$CKPT" --json "$OUT/cuda_fp32.json"
bench --dtype bfloat16 --compile-expert --presets --checkpoints "$CKPT" --json "$OUT/cuda_bf16_compiled.json"
