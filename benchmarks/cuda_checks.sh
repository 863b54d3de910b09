#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (see benchmarks/README.md, "CUDA"): the CUDA
# test, landscape.py, curvature.py and optim_step.py with --device cuda, each under its own time
# limit so that the whole stays within 9 minutes. Outputs (the printed tables as .txt, the results
# with the environment as .json) go to $OUT (or benchmarks/out).
#   bash benchmarks/cuda_checks.sh nccl   runs instead the FSDP2 checks with NCCL (within 4 minutes):
# benchmarks/fsdp_nccl.py (every optimizer, the GradScaler overflow, exact and finite-difference top
# eigenvalue, against one process) and docs/examples/fsdp_sharpness.py, under torchrun on 2 GPUs;
# with one GPU the 2-rank runs are skipped (a message says so) and the script runs on 1 rank.
# The peers and mnist1d travel as wheels in .whl/ (made here with pip download, see the README).
set -uo pipefail
mode="${1:-single}"
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/gpu.txt"
if [ "$mode" = nccl ]; then
    gpus=$(nvidia-smi -L | wc -l)
    if [ "$gpus" -ge 2 ]; then
        ranks=2
    else
        ranks=1
        echo "one GPU: the 2-rank NCCL runs are skipped (no cross-rank collective is exercised);" \
            "fsdp_nccl.py runs on 1 rank" | tee "$out/fsdp_nccl_skipped.txt"
    fi
    timeout 150 python3 -m torch.distributed.run --standalone --nproc-per-node "$ranks" \
        benchmarks/fsdp_nccl.py 2>&1 | tee "$out/fsdp_nccl.txt"
    if [ "$ranks" -ge 2 ]; then
        timeout 90 python3 -m torch.distributed.run --standalone --nproc-per-node 2 \
            docs/examples/fsdp_sharpness.py 2>&1 | tee "$out/fsdp_sharpness_nccl.txt"
    fi
    exit 0
fi
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/optim/test_agd.py -k cuda 2>&1 \
    | tee "$out/cuda_tests.txt"
timeout 90 python3 benchmarks/landscape.py --device cuda --samples 4000 --repeats 3 --min-seconds 0 \
    --out "$out/landscape_cuda.json" 2>&1 | tee "$out/landscape_cuda.txt"
timeout 150 python3 benchmarks/curvature.py --device cuda --out "$out/curvature_cuda.json" 2>&1 \
    | tee "$out/curvature_cuda.txt"
timeout 220 python3 benchmarks/optim_step.py --device cuda --sizes 10M 100M --rounds 5 \
    --only "AGD fused" "NDAdam fused" "AdaSAM fused" --out "$out/optim_cuda.json" 2>&1 \
    | tee "$out/optim_cuda.txt"
