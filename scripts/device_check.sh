#!/usr/bin/env bash
# The one prepared GPU check (issue 5). Installs nothing: the GPU image has torch, triton,
# transformers, safetensors, tokenizers, pillow and jinja2; the checkout runs through PYTHONPATH.
#
#   bash scripts/device_check.sh            on a GPU machine (< 8 minutes on an H200)
#   bash scripts/device_check.sh --dry-run  the same steps on the CPU, tiny shapes, TRITON_INTERPRET=1
#
# Steps: the Triton decode kernel (r4b_kernels/split_kv.py) on both cache layouts (contiguous, and paged:
# K/V through a random block table of 16-token blocks, shared prefixes) vs the PyTorch reference at R-4B's
# shapes (32/8 heads, head_dim 128) and at SigLIP's head_dim 72; timings of the kernel on both layouts, the
# paged gather+SDPA fallback and SDPA at contexts
# 1k/4k/8k/32k (batch 1) and 1k/4k/8k (batch 8), vs the K/V-bytes roofline; `r4b bench` on a random-init
# full-shape R-4B in bf16; the engine's greedy tokens alone vs 8 together (scripts/measure_agreement.py: packed
# prefills, paged decode). A short table is printed last.
# Results (JSON) go to $OUT when set (the device tool fetches it), else to a temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out_dir="${OUT:-$(mktemp -d)}"
mkdir -p "$out_dir"

if [[ "${1:-}" == "--dry-run" ]]; then
    export TRITON_INTERPRET=1
    # the two steps at once (their figures mean nothing here; the GPU run keeps them apart): `wait` fails the
    # script if the kernel check failed
    python scripts/kernel_check.py --dry-run --json "$out_dir/kernel.json" &
    kernel_check=$!
    python scripts/measure_agreement.py --preset tiny --prompts 4 --max-tokens 4 --concurrency 2 --threads 1 \
        --json "$out_dir/agreement.json" > /dev/null &
    agreement=$!
    # the GPU run's options on a tiny model: one variant, no load timing (tests/test_bench.py covers the rest)
    python -m r4b_core.cli bench --preset tiny --device cpu --prompt-tokens 32 --max-new-tokens 4 --repeats 1 \
        --max-repeats 1 --no-compile --variants float32 --no-load --json > "$out_dir/bench.json"
    wait "$kernel_check"
    wait "$agreement"
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    python scripts/kernel_check.py --json "$out_dir/kernel.json"
    # the engine on the GPU: paged Triton decode beside packed prefills, greedy tokens alone vs 8 together
    python scripts/measure_agreement.py --device cuda --dtype bfloat16 --prompts 16 --json "$out_dir/agreement.json"
    # bf16 only (int8 has a CPU kernel only) and no load timing (it would write an 8 GB synthetic checkpoint)
    python -m r4b_core.cli bench --preset r4b --dtype bfloat16 --device cuda --prompt-tokens 512 \
        --max-new-tokens 128 --repeats 3 --max-repeats 4 --variants bfloat16 --no-load --json > "$out_dir/bench.json"
fi
python scripts/device_report.py "$out_dir/kernel.json" "$out_dir/bench.json" "$out_dir/agreement.json"
