#!/bin/sh
# The GPU checks of issue 16 (speed), for one call of a lent GPU machine (no registry there: diffusers travels as
# a wheel). On the development machine, once:
#     sh benchmarks/gpu_check.sh prepare        # downloads the wheels into .gpu/wheels (git-ignored)
# then on the GPU machine, with .gpu carried along, one part per call (each fits the 10-minute call limit):
#     sh benchmarks/gpu_check.sh tests          # pytest --run-compile: compiled vs eager, no sync in a CUDA step
#     sh benchmarks/gpu_check.sh speed          # benchmarks/speed.py --device cuda: the side-by-side table
#     sh benchmarks/gpu_check.sh speed-all      # + fp32 and CUDA graphs, batches 64-512 (longer)
# Results go to $OUT (the device tool's output folder), else benchmarks/results/gpu.
set -eu
part=${1:-tests}
if [ "$part" = prepare ]; then
    mkdir -p .gpu/wheels
    python3 -m pip download -q --no-deps diffusers==0.42.1 importlib_metadata -d .gpu/wheels
    ls .gpu/wheels
    exit 0
fi
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target .gpu/site .gpu/wheels/*.whl
export PYTHONPATH="$PWD/src:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
(nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || echo "no nvidia-smi") | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" \
    | tee -a "$OUT/gpu.txt"
case "$part" in
    tests)
        timeout 540 python3 -m pytest -q -x --run-compile -p no:cacheprovider tests/test_fast_paths.py \
            tests/test_training_step.py 2>&1 | tee "$OUT/tests.log" ;;
    speed)
        timeout 560 python3 benchmarks/speed.py --device cuda --json "$OUT/speed_cuda.json" 2>&1 | tee "$OUT/speed.log" ;;
    speed-all)
        timeout 560 python3 benchmarks/speed.py --device cuda --modes fp32,bf16,compiled,graphs --batches 64,128,256,512 \
            --sample-batches 256 --json "$OUT/speed_cuda_all.json" 2>&1 | tee "$OUT/speed_all.log" ;;
    *)
        echo "usage: sh benchmarks/gpu_check.sh prepare|tests|speed|speed-all" >&2; exit 2 ;;
esac
