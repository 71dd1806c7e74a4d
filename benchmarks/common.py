"""Shared by the benchmarks: generated data, timed subprocesses, parsing the logs, tables.

Nothing here imports torch: the benchmarks that only run main.py and upstream_main.py as
subprocesses don't pay torch's import time (6-15 s on a small CPU machine) themselves.
"""

import argparse
import datetime
import functools
import glob
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
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


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def argument_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, one repetition: proves the benchmark runs")
    parser.add_argument(
        "--data-root", type=Path, default=DEFAULT_DATA_ROOT,
        help="where the generated data sets are cached, one folder per size (default: %(default)s, "
        "or $BENCHMARK_DATA_ROOT)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each trial subprocess")
    return parser


def images_per_batch_for(train_images: int) -> int:
    """Images per batch file such that the 90 % training split holds about `train_images`."""
    return max(2, math.ceil(train_images / 4.5))


# --------------------------------------------------------------------------------------
# Data: CIFAR-10's official python format, generated once per size and cached
# --------------------------------------------------------------------------------------


def ensure_data(data_root: Path, images_per_batch: int) -> Path:
    """Returns a --data-dir holding a generated CIFAR-10 look-alike (`images_per_batch` per file).

    Generated once and reused (the 45,000-image set takes ~10-20 s to write); written to a
    temporary folder and renamed, so concurrent benchmarks never read half a data set.
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
# Subprocesses whose output lines are timestamped as they arrive
# --------------------------------------------------------------------------------------


def child_env(**overrides) -> dict:
    """Our environment without Oríon's variables, unbuffered output, plus `overrides`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORION_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


@dataclass
class Record:
    """One log record (a rich log line and its wrapped continuation lines, joined)."""

    seconds: float  # When its first line arrived, since the process was started.
    text: str


@dataclass
class Run:
    command: list
    returncode: int
    exit_seconds: float  # Since the process was started.
    lines: list = field(default_factory=list)  # (seconds, line)
    wall_start: float = 0.0  # time.time() when it was started, to place file times (st_mtime).

    def seconds_of_file_write(self, path: Path) -> float | None:
        """When `path` was last written, in seconds since the process was started."""
        path = Path(path)
        return path.stat().st_mtime - self.wall_start if path.exists() and path.stat().st_size else None

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    @property
    def records(self) -> list:
        return log_records(self.lines)

    def find(self, pattern: str) -> list:
        """[(seconds, match)] for every record matching `pattern`."""
        regex = re.compile(pattern)
        return [(r.seconds, m) for r in self.records if (m := regex.search(r.text))]

    def first(self, pattern: str):
        found = self.find(pattern)
        return found[0] if found else (None, None)

    def last(self, pattern: str):
        found = self.find(pattern)
        return found[-1] if found else (None, None)

    def check(self, what: str) -> "Run":
        if self.returncode != 0:
            tail = "\n".join(line for _, line in self.lines[-30:])
            raise SystemExit(f"{what} failed with exit code {self.returncode}: {' '.join(self.command)}\n{tail}")
        return self


class TimedProcess:
    """Starts `command` now; a thread timestamps each output line (stdout and stderr) as it arrives."""

    def __init__(self, command, env=None, timeout=None, cwd=REPO_ROOT):
        self.command = [str(c) for c in command]
        self.lines = []
        self.wall_start = time.time()
        self.start = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", bufsize=1, env=env if env is not None else child_env(), cwd=cwd,
        )
        self.timer = threading.Timer(timeout, self.process.kill) if timeout else None
        if self.timer:
            self.timer.start()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.perf_counter() - self.start, line.rstrip("\n")))

    def wait(self) -> Run:
        returncode = self.process.wait()
        exit_seconds = time.perf_counter() - self.start
        self.reader.join()
        if self.timer:
            self.timer.cancel()
        return Run(self.command, returncode, exit_seconds, self.lines, self.wall_start)


def run_timed(command, env=None, timeout=None) -> Run:
    return TimedProcess(command, env=env, timeout=timeout).wait()


# `rich` (main.py's and upstream's logging) wraps long messages at the console's width and
# prints the time, level and source file around them: join the pieces back into one text.
_LEVEL = re.compile(r"^(?:\[[^\]]*\]\s+)?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+")
_RICH_SOURCE = re.compile(r"\s+[\w.-]+\.py:\d+\s*$")


def log_records(lines) -> list:
    records, in_rich_record = [], False
    for seconds, line in lines:
        stripped = line.strip()
        level = _LEVEL.match(stripped)
        if level:
            records.append(Record(seconds, _RICH_SOURCE.sub("", stripped[level.end():]).strip()))
            in_rich_record = True
        elif in_rich_record and line[:1].isspace() and stripped:
            records[-1].text += " " + _RICH_SOURCE.sub("", stripped).strip()
        else:
            records.append(Record(seconds, stripped))
            in_rich_record = False
    return records


# The lines main.py logs (upstream_main.py logs the same ones, see its docstring).
TRAINING_ON = r"Training on (\w+): (\d+) training and (\d+) validation images.*ready after ([\d.]+) s"
EPOCH_TRAINED = r"Epoch (\d+) trained in ([\d.]+) s \((\d+) images/s\), validated in ([\d.]+) s"
EPOCH_VALIDATED = r"Epoch (\d+): Val loss: (\S+) accuracy: ([\d.]+)%"
PEAK_MEMORY = r"Peak memory: host ([\d.]+) GiB, GPU ([\d.]+) GiB"
WORKER_MEMORY = r"Peak memory of one DataLoader worker: host ([\d.]+) GiB"


@dataclass
class Trial:
    """What a main.py or upstream_main.py run logged, with the arrival times of its lines."""

    run: Run
    device: str
    train_images: int
    ready_seconds: float  # Process start -> the "ready" line (just before the first training step).
    epochs: list  # [(train seconds, images/s, validation seconds, arrival seconds of the line)]
    accuracy: float
    peak_host_gib: float
    peak_gpu_gib: float
    worker_peak_host_gib: float | None

    @property
    def last_epoch_to_exit(self) -> float:
        """The last epoch's log line -> process exit: reporting the result and shutting down."""
        return self.run.exit_seconds - self.epochs[-1][3]


def parse_trial(run: Run, what: str) -> Trial:
    run.check(what)
    ready_at, ready = run.first(TRAINING_ON)
    epochs = [(float(m[2]), float(m[3]), float(m[4]), t) for t, m in run.find(EPOCH_TRAINED)]
    _, validated = run.last(EPOCH_VALIDATED)
    _, peak = run.last(PEAK_MEMORY)
    _, worker = run.last(WORKER_MEMORY)
    if not (ready and epochs and validated and peak):
        raise SystemExit(f"{what}: expected lines are missing from its output:\n{run.output[-3000:]}")
    return Trial(
        run=run, device=ready[1], train_images=int(ready[2]), ready_seconds=ready_at, epochs=epochs,
        accuracy=float(validated[3]) / 100, peak_host_gib=float(peak[1]), peak_gpu_gib=float(peak[2]),
        worker_peak_host_gib=float(worker[1]) if worker else None,
    )


def main_command(data_dir: Path, epochs: int, *extra) -> list:
    return [sys.executable, MAIN_PY, "--data-dir", data_dir, "--epochs", epochs, *extra]


def upstream_command(data_dir: Path, epochs: int, *extra) -> list:
    if not orion_installed():
        extra = ("--no-orion", *extra)
    return [sys.executable, UPSTREAM_MAIN_PY, "--data-dir", data_dir, "--epochs", epochs, *extra]


def results_file(folder: Path, name: str) -> Path:
    """An empty $ORION_RESULTS_PATH file, as Oríon creates it (orion.client refuses a missing one)."""
    path = Path(folder) / f"{name}.json"
    path.write_text("")
    return path


def read_objective(path: Path) -> float:
    import json

    results = json.loads(Path(path).read_text())
    return next(r["value"] for r in results if r["type"] == "objective")


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
def has_gpu_or_cpu_override(benchmark: str, cpu: bool) -> bool:
    """Whether a GPU-only benchmark should run: there is a GPU, or --cpu asked to test the script."""
    if gpu_names():
        return True
    print(f"{benchmark}: no GPU found (nvidia-smi lists none): this benchmark needs a GPU"
          + ("; running on the CPU (--cpu) only to prove the script works" if cpu else "; skipped"), flush=True)
    return cpu


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
