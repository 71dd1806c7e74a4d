#!/usr/bin/env bash
# All the GPU benchmarks, in one command, on a GPU machine (H100/H200): about 6 minutes,
# each benchmark capped so that the whole stays under 8 minutes (a capped one keeps what it printed).
#
#     bash benchmarks/run_gpu.sh [OUT_DIR] [BENCHMARK OPTIONS...]    (OUT_DIR default: $OUT, else ./benchmark-results)
#
# Options after OUT_DIR go to every benchmark: `bash benchmarks/run_gpu.sh /tmp/out --quick`
# checks this script in a minute or two on any machine.
#
# Needs a python3 with torch and torchvision, plus numpy, rich and tqdm (main.py imports them);
# Oríon is not needed (upstream's design then reports without importing it: see upstream_main.py).
# PYTHON=... picks the interpreter (default: the project's .venv if there is one, else python3).
# Writes OUT_DIR/<benchmark>.txt for each benchmark, environment.txt and run_gpu.log (everything).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmark-results}
if [[ $# -gt 0 && $1 != -* ]]; then out=$1; shift; fi
options=("$@")
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

if [[ " ${options[*]} " != *" --quick "* ]]; then
    step data 30 "$PYTHON" benchmarks/common.py 10000  # The real size (45,000 training images), once for all.
fi
# Caps in seconds (480 in all); on an H200 on 2026-11-28 these took about 7, 50, 20, 76, 35-45 and 150 s.
step epoch_time 80 "$PYTHON" benchmarks/epoch_time.py "${options[@]}"
step input_pipeline 40 "$PYTHON" benchmarks/input_pipeline.py "${options[@]}"
step gpu_concurrency 100 "$PYTHON" benchmarks/gpu_concurrency.py "${options[@]}"
step step_time 70 "$PYTHON" benchmarks/step_time.py --steps 20 "${options[@]}"
step trial_overhead 160 "$PYTHON" benchmarks/trial_overhead.py "${options[@]}"
echo "== done in $((SECONDS - started)) s, outputs in $out =="
exit $status
