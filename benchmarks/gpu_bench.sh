#!/usr/bin/env bash
# GPU benchmarks in about 5 minutes on one GPU: caching (the bare forward pass against the cache command, on CUDA),
# the all-heads probe (the newton solver's passes on CUDA, with gram_ratio against one Gram pass on the same device),
# and toy seeds (stacked seeds against one run per seed, on Lightning's gpu accelerator).
# Run: bash benchmarks/gpu_bench.sh. Without CUDA it says so and exits 0: nothing to measure.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to measure"
    exit 0
fi
python -c "import torch; print('gpu_bench: on', torch.cuda.get_device_name(0), 'with torch', torch.__version__)"
echo "== cache (GPT-2-small shape, every token, 16x data) on cuda"
python benchmarks/cache_bench.py --device cuda --base 96 --batch_size 64 --repeats 2 | tail -n 4
echo "== probe (GPT-2-small and LLaMA-7B shapes; the solver on cuda, the scikit-learn loop on the CPU)"
python benchmarks/probe_bench.py | grep -E "Gram pass|end to end|speedup|probe_bench"
echo "== toy seeds (8 stacked seeds against 8 runs) on gpu"
python benchmarks/seeds_bench.py --accelerator gpu --steps 300 | tail -n 3
