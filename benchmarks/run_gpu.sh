#!/usr/bin/env bash
# The GPU checks and figures, in one command, on a GPU machine (H100/H200): about 7 minutes,
# each part capped so that the whole stays under 9 (a capped one keeps what it printed):
# first the GPU correctness tests (tests/test_cuda_graph.py, if it exists), then step_time,
# epoch_time (10-epoch trials), gpu_concurrency (1 and 5 trials, --cuda-graph), trial_overhead.
# (input_pipeline.py is left out: it does not depend on the training step; run it on its own.)
#
#     bash benchmarks/run_gpu.sh [OUT_DIR] [BENCHMARK OPTIONS...]    (OUT_DIR default: $OUT, else ./benchmark-results)
#
# Options after OUT_DIR go to every benchmark: `bash benchmarks/run_gpu.sh /tmp/out --quick`
# checks this script in a minute or two on any machine (without a GPU, the GPU-only parts run
# on the CPU: --cpu). Needs a python3 with torch and torchvision, plus numpy, rich and tqdm
# (main.py imports them) and pytest; Oríon is not needed (upstream's design then reports
# without importing it: see upstream_main.py). PYTHON=... picks the interpreter (default: the
# project's .venv if there is one, else python3). Writes to OUT_DIR at most 7 files:
# environment.txt, cuda_graph_tests.txt, one <benchmark>.txt each, and run_gpu.log (all of it).
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
# Every trial is a fresh process: run them from compiled bytecode, as `uv sync` (compile-bytecode)
# leaves the project's environment, even where site-packages is read-only or .pyc writes are off.
# The environment step below times the first import (compiling) and the second.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-${TMPDIR:-/tmp}/orion-example-pycache}
exec > >(tee "$out/run_gpu.log") 2>&1
started=$SECONDS
status=0
quick=0; [[ " ${options[*]} " == *" --quick "* ]] && quick=1
nvidia-smi -L >/dev/null 2>&1 || options+=(--cpu)  # No GPU: a check of this script.

step() {  # step NAME MAX_SECONDS COMMAND...: runs COMMAND, its output also in $out/NAME.txt
    local name=$1 seconds=$(($2 * (quick ? 3 : 1)))  # --quick: the caps are for a GPU, not for a small CPU.
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
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: none"
    grep -m1 "model name" /proc/cpuinfo; echo "CPUs: $(nproc)"
    for import_ in "first (compiles the bytecode)" second; do
        echo "import torch + resnet18 + main.py's imports, $import_: $( { TIMEFORMAT=%R; time "$PYTHON" -c \
            "import torch, rich.logging, tqdm, numpy; from torchvision.models import resnet18" ; } 2>&1 ) s"
    done
    "$PYTHON" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__,
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"
    "$PYTHON" -c "import rich, tqdm, numpy, pytest; print('rich, tqdm, numpy, pytest: present')" \
        || echo "!! main.py needs rich, tqdm and numpy; the tests need pytest"
    "$PYTHON" -c "import orion" 2>/dev/null && echo "orion: installed" || echo "orion: not installed"
    # The real size (45,000 training images), generated once for all.
    [[ $quick == 1 ]] || timeout 60 "$PYTHON" benchmarks/common.py 10000 || echo "!! generating the data failed"
} 2>&1 | tee "$out/environment.txt"

if [[ -f tests/test_cuda_graph.py ]]; then
    step cuda_graph_tests 75 "$PYTHON" -m pytest -p no:cacheprovider -q -rs tests/test_cuda_graph.py
else
    echo "== cuda_graph_tests: tests/test_cuda_graph.py does not exist: skipped =="
fi
# Caps in seconds, 575 in all with the tests' (the environment and data: about 30 more on an H200).
step step_time 90 "$PYTHON" benchmarks/step_time.py "${options[@]}"
step epoch_time 240 "$PYTHON" benchmarks/epoch_time.py "${options[@]}"
step gpu_concurrency 60 "$PYTHON" benchmarks/gpu_concurrency.py "${options[@]}" --cuda-graph
step trial_overhead 50 "$PYTHON" benchmarks/trial_overhead.py --repeat 1 "${options[@]}"
step streaming 60 "$PYTHON" benchmarks/streaming.py --photos 3000 "${options[@]}"
echo "== done in $((SECONDS - started)) s, outputs in $out =="
exit $status
