"""Shared by the benchmarks: generated data, trial subprocesses and their metrics, tables.

A trial (main.py or upstream_main.py) runs as a subprocess with `--checkpoint-dir FOLDER`;
what it measured is read from FOLDER/metrics.jsonl (one JSON line per epoch, main.py's
format, which upstream_main.py writes too), never from its log. Nothing here imports torch
(but `in_process_trial`, when called): the benchmarks that only run subprocesses don't pay
torch's import time themselves.
"""

import argparse
import datetime
import functools
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
MAIN_PY = REPO_ROOT / "main.py"
UPSTREAM_MAIN_PY = BENCHMARKS_DIR / "upstream_main.py"

# The generated CIFAR-10 look-alike lives with the tests; `import main` needs the repo root.
for _path in (REPO_ROOT / "tests", REPO_ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# CIFAR-10's real size: 5 training batch files of 10,000 images -> 45,000 train / 5,000 validation.
FULL_IMAGES_PER_BATCH = 10_000
DEFAULT_DATA_ROOT = Path(os.environ.get("BENCHMARK_DATA_ROOT", Path(tempfile.gettempdir()) / "orion-example-benchmark-data"))


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, one repetition: proves the benchmark runs")
    parser.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA_ROOT,
        help="where the generated data sets are cached, one folder per size (default: %(default)s, "
        "or $BENCHMARK_DATA_ROOT)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each trial subprocess")
    parser.add_argument("--cpu", action="store_true",
                        help="without a GPU, run the GPU-only parts on the CPU anyway (to test the script)")
    return parser


def images_per_batch_for(train_images: int) -> int:
    """Images per batch file such that the 90 % training split holds about `train_images`."""
    return max(2, math.ceil(train_images / 4.5))


def ensure_data(data_root: Path, images_per_batch: int) -> Path:
    """Returns a --data-dir holding a generated CIFAR-10 look-alike (`images_per_batch` per file).

    Generated once and reused; written to a temporary folder and renamed, so concurrent
    benchmarks never read half a data set.
    """
    from cifar10_lookalike import write_cifar10_lookalike

    data_dir = Path(data_root) / f"cifar10-lookalike-{images_per_batch}"
    if (data_dir / "cifar-10-batches-py" / "test_batch").is_file():
        return data_dir
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".writing-", dir=data_dir.parent))
    started = time.perf_counter()
    print(f"Generating a CIFAR-10 look-alike, {images_per_batch} images per batch file, in {data_dir} ...", flush=True)
    try:
        write_cifar10_lookalike(staging, images_per_batch=images_per_batch)
        try:
            staging.rename(data_dir)
        except OSError:
            if not (data_dir / "cifar-10-batches-py" / "test_batch").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"... written in {time.perf_counter() - started:.1f} s", flush=True)
    return data_dir


# --------------------------------------------------------------------------------------
# Trials: a subprocess, its metrics.jsonl, its results file
# --------------------------------------------------------------------------------------


def child_env(**overrides) -> dict:
    """Our environment without Oríon's variables, unbuffered output, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def main_command(data_dir: Path, epochs: int, *extra) -> list:
    return [sys.executable, MAIN_PY, "--data-dir", data_dir, "--epochs", epochs, *extra]


def upstream_command(data_dir: Path, epochs: int, *extra) -> list:
    if not orion_installed() and "--no-orion" not in extra:
        extra = ("--no-orion", *extra)
    return [sys.executable, UPSTREAM_MAIN_PY, "--data-dir", data_dir, "--epochs", epochs, *extra]


# Every line of metrics.jsonl holds these (main.py's record; upstream_main.py writes the same).
METRICS_KEYS = [
    "epoch", "train_loss", "val_loss", "val_accuracy", "train_seconds", "val_seconds", "examples_per_second",
    "trained_examples", "train_examples", "valid_examples", "ready_seconds", "seconds_since_start", "device",
    "peak_host_gib", "peak_gpu_gib", "diverged", "end_time",
]


@dataclass
class Trial:
    """One trial process run as Oríon runs it: $ORION_RESULTS_PATH set to an empty file, and
    `--checkpoint-dir folder`, where it writes metrics.jsonl (its output goes to folder/output.txt).

    Times are wall-clock (time.time()), so that they compare with metrics.jsonl's `end_time`
    and the results file's mtime; `started` is taken just before the process is started.
    """

    name: str
    command: list
    folder: Path
    process: subprocess.Popen
    started: float
    ended: float | None = None  # When it exited.
    epochs: list | None = None  # metrics.jsonl's records.
    result_wall: float | None = None  # When the objective was written (the results file's mtime), if it was.
    objective: float | None = None

    @classmethod
    def start(cls, name: str, command: list, folder: Path, **env) -> "Trial":
        folder = Path(folder)
        folder.mkdir(parents=True)
        (folder / "results.json").write_text("")  # Oríon creates it empty; orion.client refuses a missing one.
        command = [str(c) for c in command] + ["--checkpoint-dir", str(folder)]
        with open(folder / "output.txt", "w") as output:
            started = time.time()
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO_ROOT,
                env=child_env(ORION_RESULTS_PATH=folder / "results.json", **env),
            )
        return cls(name, command, folder, process, started)

    def wait(self, timeout: float | None = None) -> "Trial":
        """Waits for the exit (killing it after `timeout` s), then reads metrics.jsonl; exits on failure."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.ended = time.time()
        metrics = self.folder / "metrics.jsonl"
        self.epochs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        if self.process.returncode != 0 or not self.epochs:
            tail = "\n".join((self.folder / "output.txt").read_text(errors="replace").splitlines()[-30:])
            raise SystemExit(f"{self.name}: exit code {self.process.returncode}, {len(self.epochs)} epoch(s) in "
                             f"{metrics}: {' '.join(self.command)}\n{tail}")
        missing = [key for key in METRICS_KEYS if any(key not in e for e in self.epochs)]
        if missing:
            raise SystemExit(f"{self.name}: metrics.jsonl lacks {missing}: {' '.join(self.command)}")
        results = self.folder / "results.json"
        if results.stat().st_size:
            self.result_wall = results.stat().st_mtime
            self.objective = next(r["value"] for r in json.loads(results.read_text()) if r["type"] == "objective")
        return self

    @property
    def last(self) -> dict:
        return self.epochs[-1]

    @property
    def first_step_wall(self) -> float:
        """time.time() of the first training step. `ready_seconds` counts from the start of the
        script's main(), after its imports: main()'s start is placed from `seconds_since_start`."""
        first = self.epochs[0]
        return first["end_time"] - first["seconds_since_start"] + first["ready_seconds"]

    @property
    def start_to_first_step(self) -> float:
        return self.first_step_wall - self.started

    @property
    def start_to_objective(self) -> float | None:
        return self.result_wall - self.started if self.result_wall else None

    @property
    def train_seconds(self) -> list:
        return [e["train_seconds"] for e in self.epochs]


def run_trial(name: str, command: list, folder: Path, timeout: float | None = None, **env) -> Trial:
    print(f"running {name}: {' '.join(map(str, command[1:]))}", flush=True)
    return Trial.start(name, command, folder, **env).wait(timeout)


def in_process_trial(*argv):
    """(main.py's module, its args from `argv`, a trial_support.Trial for them): for the benchmarks
    that time main.py's own functions in this process (input_pipeline.py, step_time.py).

    The Trial picks the device and its settings as main() does (without main()'s stop-signal
    handler, which only `Trial.start` installs). Imports torch: call it after the header is printed.
    """
    import main
    from trial_support import Trial

    args = main.parse_args([str(arg) for arg in argv])
    return main, args, Trial(args)


# --------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------


def orion_installed() -> bool:
    return importlib.util.find_spec("orion") is not None


def cpu_count() -> int:
    """CPUs of this task, the way upstream counts DataLoader workers."""
    if "SLURM_CPUS_PER_TASK" in os.environ:
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def gpu_names() -> tuple:
    """The NVIDIA GPUs here (empty where there is none), without importing torch in this process.

    Asks nvidia-smi; where it is not on the PATH but /dev/nvidia0 exists, asks torch in a subprocess.
    """
    if shutil.which("nvidia-smi"):
        command = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    elif glob.glob("/dev/nvidia[0-9]*"):
        command = [sys.executable, "-c", "import torch; [print(torch.cuda.get_device_name(i)) for i in range(torch.cuda.device_count())]"]
    else:
        return ()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(line.strip() for line in result.stdout.splitlines() if line.strip()) if result.returncode == 0 else ()


def has_gpu_or_cpu_override(benchmark: str, cpu: bool) -> bool:
    """Whether a GPU-only benchmark should run: there is a GPU, or --cpu asked to test the script."""
    if gpu_names():
        return True
    print(f"{benchmark}: no GPU found (nvidia-smi lists none): this benchmark needs a GPU"
          + ("; running on the CPU (--cpu) only to prove the script works" if cpu else "; skipped"), flush=True)
    return cpu


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def print_header(title: str, args=None) -> None:
    gpus = gpu_names()
    print(f"== {title} ==")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine: {cpu_model()}, {cpu_count()} CPUs; GPU: {', '.join(gpus) if gpus else 'none'}")
    print(
        f"python {platform.python_version()}, torch {package_version('torch')}, "
        f"torchvision {package_version('torchvision')}, orion {package_version('orion')}"
    )
    if hasattr(os, "getloadavg"):
        print("load average before: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("command: " + " ".join([Path(sys.executable).name, *map(str, sys.argv)]), flush=True)


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(numerator, denominator) -> str:
    """'3.2x', or '-' where either is missing."""
    return f"{numerator / denominator:.1f}x" if numerator is not None and denominator else "-"


def print_table(title: str, columns: list, rows: list, notes: list = ()) -> str:
    """Prints a plain-text table (every cell already a string or formatted by `fmt`) and returns it."""
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(str(col)), *(len(row[i]) for row in cells)) if cells else len(str(col)) for i, col in enumerate(columns)]
    # Left-align the first column (names), right-align the numbers.
    def line(row):
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()
    text = ["", title, line(columns), "  ".join("-" * w for w in widths)]
    text += [line(row) for row in cells]
    text += [f"  {note}" for note in notes]
    output = "\n".join(text)
    print(output, flush=True)
    return output


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


if __name__ == "__main__":  # python benchmarks/common.py [IMAGES_PER_BATCH]: generate (and cache) a data set.
    print(ensure_data(DEFAULT_DATA_ROOT, int(sys.argv[1]) if len(sys.argv) > 1 else FULL_IMAGES_PER_BATCH))
