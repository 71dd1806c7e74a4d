"""Several main.py trials at once on the CPU: what OpenMP's thread settings cost when the
threads outnumber the cores (the test suite on 2 cores; a node whose jobs are not confined to
their CPUs).

Starts --trials main.py trials together (the tests' sample: 500 images, 2 epochs, batch 32),
waits for all, and reports the wall time from the first start to the last exit, and the CPU
time of the trials (user + system, from the children's rusage), for each setting:

- OMP_NUM_THREADS=4 (job.sh's threads under Slurm: --cpus-per-task=4), OpenMP's default wait
  policy (a thread that waits for work spins a while before it sleeps);
- the same with OMP_WAIT_POLICY=PASSIVE (a waiting thread sleeps at once: tests/conftest.py);
- OMP_NUM_THREADS=1.

    uv run python benchmarks/concurrent_trials.py [--quick] [--trials 4] [--epochs 2]
"""

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import common

SETTINGS = [
    ("4 threads, spin then sleep (default)", {"OMP_NUM_THREADS": "4"}),
    ("4 threads, OMP_WAIT_POLICY=PASSIVE", {"OMP_NUM_THREADS": "4", "OMP_WAIT_POLICY": "PASSIVE"}),
    ("1 thread", {"OMP_NUM_THREADS": "1"}),
]


def run_together(n: int, epochs: int, data_dir: Path, folder: Path, env: dict, timeout: float) -> tuple:
    """(wall seconds, CPU seconds of the trials) for `n` trials started together."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.time()
    trials = [common.Trial.start(f"trial {i}", common.main_command(data_dir, epochs, "--batch-size", 32),
                                 folder / str(i), **env) for i in range(n)]
    for trial in trials:
        trial.wait(timeout)
    wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--trials", type=int, default=4, help="trials at once (default 4)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs = 1, 1  # Proves it runs; a trial per setting (4 threads spinning cost most).
    if args.trials < 1 or args.epochs < 1:
        parser.error("--trials and --epochs must be at least 1")
    common.print_header("Concurrent trials on the CPU: OpenMP threads and wait policy", args)
    os.environ.pop("OMP_WAIT_POLICY", None)  # Each setting says its own (the test suite sets PASSIVE).
    data_dir = common.ensure_data(args.data_root, 100)  # 500 images, as the tests' sample.
    root = Path(tempfile.mkdtemp(prefix="concurrent-trials-"))
    rows = []
    try:
        for name, env in SETTINGS:
            wall, cpu = run_together(args.trials, args.epochs, data_dir, root / str(len(rows)), env, args.timeout)
            rows.append([name, args.trials, wall, cpu])
            print(f"{name}: {args.trials} trials in {wall:.1f} s, CPU {cpu:.1f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    common.print_table("Concurrent trials", ["OpenMP setting", "trials", "wall s", "CPU s"], rows,
                       [f"{args.trials} main.py trials at once, {args.epochs} epoch(s) each, 500 images, batch 32, "
                        f"{os.cpu_count()} CPUs; wall: first start -> last exit; CPU: the trials' user + system"])


if __name__ == "__main__":
    main()
