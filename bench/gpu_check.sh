#!/usr/bin/env bash
# The write path on a CUDA machine: raw encode() vs the worker, one-by-one vs
# batched, in fp16 at batch sizes 32-256 (the seed claims 10-50x for batching
# on a GPU). Run from anywhere, on a machine with an NVIDIA GPU:
#
#     bench/gpu_check.sh [--rows 2000]
#
# It sets up .venv the way the README does when there is none, refuses to run
# on a torch without CUDA (the pinned CPU wheel), and prints the table of
# bench/write_path.py without touching BENCHMARKS.md (pass --write to record it).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if [ ! -x .venv/bin/python ]; then
    python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt
fi
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') sees no CUDA device." >&2
    echo "gpu_check: on a GPU machine install a CUDA build of the pinned torch into .venv, then run this again." >&2
    exit 1
fi
.venv/bin/python -c "import torch; print('GPU:', torch.cuda.get_device_name(0))"
write="--no-write"
args=()
for arg in "$@"; do
    if [ "$arg" = "--write" ]; then write=""; else args+=("$arg"); fi
done
exec .venv/bin/python bench/write_path.py --device cuda --fp16 --batch-sizes 32,64,128,256 ${write} "${args[@]}"
