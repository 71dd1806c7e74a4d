"""benchmarks/: each benchmark runs in --quick mode and prints its table (no timing assertions).

The quick runs are started all at once, each test waiting for its own: they are mostly child
processes importing torch, which overlap well. With one thread per process: several
processes each running 2 OpenMP threads on 2 cores slow each other down many times over.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"

# name -> (command-line options, the table's title, a column header, what a row starts with)
QUICK_RUNS = {
    "input_pipeline": ([], "Input pipeline", "batches/s", "ours: uint8 on the device"),
    "trial_overhead": ([], "Trial overhead", "start -> first step", "ours: main.py"),
    "epoch_time": ([], "Epoch time", "images/s", "ours: main.py"),
    # On a machine without a GPU, --cpu runs the same code on the CPU (see the script).
    "gpu_concurrency": (["--cpu", "--trials", "2"], "GPU concurrency", "wall images/s", "2 "),
}


def load_common():
    """benchmarks/common.py, under a name of its own (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmarks_common", BENCHMARKS / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    data_root = tmp_path_factory.mktemp("benchmark-data")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    processes = {
        name: subprocess.Popen(
            [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--data-root", str(data_root), *options],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT, env=env,
        )
        for name, (options, *_) in QUICK_RUNS.items()
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.parametrize("name", QUICK_RUNS)
def test_quick_run_prints_its_table(quick_runs, name):
    _, title, column, row_start = QUICK_RUNS[name]
    output, _ = quick_runs[name].communicate(timeout=600)
    assert quick_runs[name].returncode == 0, output
    lines = output.splitlines()
    assert title in lines, output
    header = lines[lines.index(title) + 1]
    assert column in header, output
    assert set(lines[lines.index(title) + 2].replace(" ", "")) == {"-"}, output  # The rule under the header.
    assert any(line.startswith(row_start) for line in lines[lines.index(title) + 3 :]), output
    assert "machine:" in output and "command:" in output, output


@pytest.mark.parametrize("name", ["gpu_concurrency", "step_time"])
def test_gpu_benchmarks_without_a_gpu_say_they_need_one(tmp_path, name):
    if load_common().gpu_names():
        pytest.skip("this machine has a GPU")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--data-root", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "this benchmark needs a GPU" in result.stdout


def test_log_records_join_rich_wrapped_lines():
    common = load_common()
    lines = [
        "[11/28/26 08:18:45] INFO     Training on cpu: 450 training and 50 validation images, 4 steps per epoch;      main.py:377",
        "                             ready after 0.2 s                                                               ",
        "[11/28/26 08:18:48] INFO     Epoch 0 trained in 2.89 s (156 images/s), validated in 0.09 s                   main.py:435",
        "Done!",
    ]
    run = common.Run(["main.py"], 0, 5.0, [(float(i), line) for i, line in enumerate(lines)])
    seconds, match = run.first(common.TRAINING_ON)
    assert seconds == 0.0 and match.group(1) == "cpu" and match.group(4) == "0.2"
    seconds, match = run.first(common.EPOCH_TRAINED)
    assert seconds == 2.0 and match.group(2) == "2.89" and match.group(4) == "0.09"
    assert [r.text for r in run.records][-1] == "Done!"
