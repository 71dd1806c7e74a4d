"""benchmarks/: each benchmark runs in --quick mode and prints its table (no timing assertions).

The quick runs are started all at once, each test waiting for its own: they are mostly child
processes importing torch, which overlap well. With one thread per process: several
processes each running 2 OpenMP threads on 2 cores slow each other down many times over.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO_ROOT / "benchmarks"

# name -> (command-line options, the table's title, a column header, what some rows start with)
QUICK_RUNS = {
    "input_pipeline": ([], "Input pipeline", "batches/s", ["ours: uint8 on the device", "upstream"]),
    "trial_overhead": ([], "Trial overhead", "start -> first step", ["floor", "ours: main.py", "upstream"]),
    "epoch_time": ([], "Trial time", "start -> objective s", ["ours: main.py", "upstream"]),
    # On a machine without a GPU, --cpu runs the same code on the CPU (see the scripts).
    "gpu_concurrency": (["--cpu", "--trials", "2", "--cuda-graph"], "GPU concurrency", "wall images/s", ["2 "]),
    "step_time": (["--cpu"], "Step time", "ms/step", ["eager", "--cuda-graph", "--compile reduce-overhead", "upstream"]),
    "concurrent_trials": ([], "Concurrent trials", "wall s", ["4 threads, spin", "4 threads, OMP_WAIT_POLICY", "1 thread"]),
    "tpe_lock": ([], "Algorithm-lock holds (median), TPE", "ceiling trials/s", ["30"]),
    "streaming": ([], "300 PNG photos (~64 x 64, resized to 48 x 48), cpu, batch 128, 1 epoch(s)", "batches/s (all)", ["ours: uint8 in workers", "upstream: ToTensor"]),
    "prior_fit": ([], "1 random trial(s) per prior, 1 epoch(s), batch 64, look-alike of 500 images", "reach 90 %", ["--learning-rate~'loguniform(1e-5, 1.0)'"]),
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
    outputs = {}

    def finished(name: str) -> tuple[int, str]:
        """(exit code, output) of the quick run `name`, once it has finished."""
        if name not in outputs:
            outputs[name] = processes[name].communicate(timeout=600)[0]
        return processes[name].returncode, outputs[name]

    yield finished
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.wait()


def table_lines(output: str, title: str) -> list:
    """The table titled `title`: its header, the rule under it, its rows and notes."""
    lines = output.splitlines()
    return lines[lines.index(title) + 1 :] if title in lines else []


@pytest.mark.parametrize("name", QUICK_RUNS)
def test_quick_run_exits_0(quick_runs, name):
    returncode, output = quick_runs(name)
    assert returncode == 0, output


@pytest.mark.parametrize("name", QUICK_RUNS)
def test_quick_run_prints_its_table(quick_runs, name):
    _, title, column, row_starts = QUICK_RUNS[name]
    _, output = quick_runs(name)
    table = table_lines(output, title)
    assert table, output
    assert column in table[0], output
    assert set(table[1].replace(" ", "")) == {"-"}, output  # The rule under the header.
    for row_start in row_starts:
        assert any(line.startswith(row_start) for line in table[2:]), f"no row starts with {row_start!r}:\n{output}"


@pytest.mark.parametrize("name", QUICK_RUNS)
def test_quick_run_prints_the_machine_and_command(quick_runs, name):
    _, output = quick_runs(name)
    assert "machine:" in output, output
    assert any(line.startswith("command: ") and f"{name}.py --quick" in line for line in output.splitlines()), output


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


# A stand-in trial: writes one epoch of metrics.jsonl, with the keys given as argv[2] (main() started
# 2 s before the epoch's end, its first step 0.5 s after its start), and the objective, as main.py does.
FAKE_TRIAL = """
import json, os, sys, time
from pathlib import Path
folder = Path(sys.argv[sys.argv.index("--checkpoint-dir") + 1])
record = dict.fromkeys(json.loads(sys.argv[2]), 0)
record |= {"end_time": time.time(), "seconds_since_start": 2.0, "ready_seconds": 0.5, "train_seconds": 1.0}
(folder / "metrics.jsonl").write_text(json.dumps(record) + "\\n")
Path(os.environ["ORION_RESULTS_PATH"]).write_text(json.dumps([{"name": "o", "type": "objective", "value": 0.25}]))
sys.exit(int(sys.argv[1]))
"""


def fake_trial(tmp_path, exit_code: int = 0, keys: list | None = None):
    common = load_common()
    keys = common.METRICS_KEYS if keys is None else keys
    return common.Trial.start("fake", [sys.executable, "-c", FAKE_TRIAL, exit_code, json.dumps(keys)], tmp_path / "trial")


def test_trial_reads_its_metrics_and_objective(tmp_path):
    trial = fake_trial(tmp_path).wait(60)
    assert trial.train_seconds == [1.0]
    assert trial.objective == 0.25
    assert trial.first_step_wall == pytest.approx(trial.last["end_time"] - 1.5)
    assert trial.started <= trial.result_wall <= trial.ended


def test_trial_that_fails_stops_the_benchmark_with_its_exit_code(tmp_path):
    with pytest.raises(SystemExit, match="fake: exit code 3"):
        fake_trial(tmp_path, exit_code=3).wait(60)


def test_trial_without_main_pys_metrics_keys_stops_the_benchmark(tmp_path):
    with pytest.raises(SystemExit, match="fake: metrics.jsonl lacks .*'peak_gpu_gib'"):
        fake_trial(tmp_path, keys=["epoch"]).wait(60)
