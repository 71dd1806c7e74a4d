#!/usr/bin/env bash
# All the GPU benchmarks, in one command, on a GPU machine (H100/H200): about 3-5 minutes,
# each benchmark capped so that the whole stays under 8 minutes.
#
#     bash benchmarks/run_gpu.sh [OUT_DIR]          (default: $OUT, else ./benchmark-results)
#
# Needs a python3 with torch and torchvision, plus numpy, rich and tqdm (main.py imports them);
# Oríon is not needed (upstream's design then reports without importing it: see upstream_main.py).
# PYTHON=... picks the interpreter (default: the project's .venv if there is one, else python3).
# Writes OUT_DIR/<benchmark>.txt for each benchmark, environment.txt and run_gpu.log (everything).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmark-results}}
mkdir -p "$out"
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export BENCHMARK_DATA_ROOT=${BENCHMARK_DATA_ROOT:-${TMPDIR:-/tmp}/orion-example-benchmark-data}
export PYTHONUNBUFFERED=1
exec > >(tee "$out/run_gpu.log") 2>&1
started=$SECONDS
status=0

step() {  # step NAME MAX_SECONDS COMMAND...: runs COMMAND, its output also in $out/NAME.txt
    local name=$1 seconds=$2
    shift 2
    echo "== $name (at most $seconds s; $((SECONDS - started)) s elapsed) =="
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee "$out/$name.txt"
    local rc=${PIPESTATUS[0]}
    if [[ $rc != 0 ]]; then
        echo "!! $name exited with $rc$([[ $rc == 124 ]] && echo ' (out of time)')"
        status=1
    fi
}

{
    date -Is
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: none"
    grep -m1 "model name" /proc/cpuinfo; echo "CPUs: $(nproc)"
    "$PYTHON" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
    "$PYTHON" -c "import rich, tqdm, numpy; print('rich, tqdm, numpy: present')" || echo "!! main.py needs rich, tqdm and numpy"
    "$PYTHON" -c "import orion" 2>/dev/null && echo "orion: installed" || echo "orion: not installed"
} 2>&1 | tee "$out/environment.txt"

step data 60 "$PYTHON" benchmarks/common.py 10000
step epoch_time 110 "$PYTHON" benchmarks/epoch_time.py
step input_pipeline 50 "$PYTHON" benchmarks/input_pipeline.py
step gpu_concurrency 120 "$PYTHON" benchmarks/gpu_concurrency.py
step trial_overhead 130 "$PYTHON" benchmarks/trial_overhead.py
echo "== done in $((SECONDS - started)) s, outputs in $out =="
exit $status
