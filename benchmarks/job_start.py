"""Job start: `sbatch` -> the first training step of each task's trial, on the tests' real Slurm.

Starts the single-node Slurm of the tests (tests/slurm/cluster.sh: root, Debian), writes the
generated CIFAR-10 look-alike as the staged archive, and submits, as a user would,

    sbatch --array=1-N job.sh --epochs 1        # ORION_MAX_TRIALS=N: one trial per task

from --repo (default: this checkout; another checkout measures another version of job.sh,
with this checkout's .venv if it has none). Each trial's first training step is read from its
metrics.jsonl (end_time - seconds_since_start + ready_seconds); the figure is that time minus
the moment sbatch was called. What it includes: Slurm's scheduling, staging the data, the
environment's check (or sync), the database checks, the worker's start (`python -m orion_tools hunt`)
and the trial's own start (imports, data, model). Median and max over tasks and --repeat runs.

    uv run python benchmarks/job_start.py [--tasks 4] [--repeat 2] [--repo DIR]
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

sys.path.insert(0, str(common.REPO_ROOT / "tests"))
from cifar10_lookalike import write_cifar10_archive  # noqa: E402

CLUSTER_SH = common.REPO_ROOT / "tests" / "slurm" / "cluster.sh"


def first_steps(trials_dir: Path) -> list[float]:
    """The wall-clock time of each trial's first training step, from its metrics.jsonl."""
    times = []
    for metrics in trials_dir.glob("*/metrics.jsonl"):
        first = json.loads(metrics.read_text().splitlines()[0])
        times.append(first["end_time"] - first["seconds_since_start"] + first["ready_seconds"])
    return sorted(times)


def one_job(repo: Path, slurm_env: dict, folder: Path, tasks: int, timeout: float) -> list[float]:
    """Submits the array; returns submit -> first step of each task's trial, in seconds."""
    write_cifar10_archive(folder / "datasets", images_per_batch=100)
    env = {**slurm_env, "SCRATCH": str(folder / "scratch"), "XDG_CONFIG_HOME": str(folder / "config"),
           "CIFAR10_ARCHIVE": str(folder / "datasets" / "cifar-10-python.tar.gz"),
           "ORION_MAX_TRIALS": str(tasks)}
    submitted = time.time()
    result = subprocess.run(["timeout", str(timeout), "sbatch", "--wait", f"--array=1-{tasks}",
                             f"--output={folder}/slurm-%A_%a.out", "job.sh", "--epochs", "1"],
                            cwd=repo, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        outputs = "".join(p.read_text() for p in folder.glob("slurm-*.out"))
        raise SystemExit(f"the job failed ({result.returncode}): {result.stderr}\n{outputs[-3000:]}")
    starts = first_steps(folder / "scratch" / "orion-example" / "orion-example")
    return [start - submitted for start in starts]


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--tasks", type=int, default=4, help="array tasks, one trial each (default 4)")
    parser.add_argument("--repeat", type=int, default=2, help="jobs submitted one after the other (default 2)")
    parser.add_argument("--repo", type=Path, default=common.REPO_ROOT, help="the checkout whose job.sh runs")
    args = parser.parse_args()
    repo = args.repo.resolve()
    if not (repo / ".venv").exists():
        (repo / ".venv").symlink_to(common.REPO_ROOT / ".venv")
    common.print_header("Job start: sbatch -> first training step of each task's trial (test Slurm)", args)
    print(f"job.sh of {repo}", flush=True)
    with tempfile.TemporaryDirectory(prefix="job-start-") as temporary:
        state = Path(temporary, "slurm")
        started = subprocess.run(["bash", CLUSTER_SH, "start", state], capture_output=True, text=True, timeout=600)
        if started.returncode != 0:
            raise SystemExit(f"could not start the test Slurm: {started.stderr[-2000:]}")
        slurm_env = {k: v for k, v in common.child_env().items() if not k.startswith(("ORION_", "SLURM_"))}
        slurm_env.update(SLURM_CONF=started.stdout.strip().removeprefix("export SLURM_CONF="),
                         PATH=f"/usr/sbin:/usr/bin:{os.environ['PATH']}")
        try:
            delays = []
            for i in range(1 if args.quick else args.repeat):
                delays += one_job(repo, slurm_env, Path(temporary, f"job-{i}"), args.tasks, args.timeout)
                print(f"job {i + 1}: " + ", ".join(f"{d:.1f}" for d in delays[-args.tasks:]) + " s", flush=True)
        finally:
            subprocess.run(["bash", CLUSTER_SH, "stop", state], capture_output=True, timeout=300)
    common.print_table("Job start", ["tasks", "jobs", "submit -> first step, median (s)", "max (s)"],
                       [[args.tasks, 1 if args.quick else args.repeat, common.fmt(common.median(delays), 1),
                         common.fmt(max(delays), 1)]],
                       notes=[f"job.sh of {repo}"])


if __name__ == "__main__":
    main()
