#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (see benchmarks/README.md, "CUDA"): the CUDA
# test, landscape.py, curvature.py and optim_step.py with --device cuda, each under its own time
# limit so that the whole stays within 9 minutes. Outputs (the printed tables as .txt, the results
# with the environment as .json) go to $OUT (or benchmarks/out).
# The peers and mnist1d travel as wheels in .whl/ (made here with pip download, see the README).
set -uo pipefail
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
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/optim/test_agd.py -k cuda 2>&1 \
    | tee "$out/cuda_tests.txt"
timeout 90 python3 benchmarks/landscape.py --device cuda --samples 4000 --repeats 3 --min-seconds 0 \
    --out "$out/landscape_cuda.json" 2>&1 | tee "$out/landscape_cuda.txt"
timeout 150 python3 benchmarks/curvature.py --device cuda --out "$out/curvature_cuda.json" 2>&1 \
    | tee "$out/curvature_cuda.txt"
timeout 220 python3 benchmarks/optim_step.py --device cuda --sizes 10M 100M --rounds 5 \
    --only "AGD fused" "NDAdam fused" "AdaSAM fused" --out "$out/optim_cuda.json" 2>&1 \
    | tee "$out/optim_cuda.txt"
