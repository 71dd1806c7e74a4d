"""Trial overhead: what every Oríon trial (a fresh Python process) pays before and after training.

For each design, one trial of one epoch, run as Oríon runs it ($ORION_RESULTS_PATH set to an
existing empty file), read from its metrics.jsonl and results file:

- start -> first step: the process's start -> its first training step (`ready_seconds`);
- last epoch -> result: the last epoch's `end_time` -> the results file written (its mtime);
- -> exit: the last epoch's `end_time` -> the process gone (when Oríon reads the result);

beside the floor: a process that only runs `import torch; from torchvision.models import
resnet18` (on a GPU also: the same plus creating the CUDA context), then prints `time.time()`
and exits: its "first step" is that time, its "-> exit" the interpreter's shutdown (which
every trial pays too). Medians of --repeat runs, interleaved. Upstream imports `orion.client`
at the top, if Oríon is installed; its row without that import (--no-orion) shows what the
import costs.

    uv run python benchmarks/trial_overhead.py [--quick] [--repeat 3]
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

FLOOR = "import torch; from torchvision.models import resnet18"
FLOOR_CUDA = FLOOR + "; torch.zeros(1, device='cuda')"
PRINT_TIME = "import time; print(time.time(), flush=True)"


def run_floor(command, timeout) -> tuple:
    """(start -> imports done, imports done -> exit) of a floor process."""
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=common.child_env())
    ended = time.time()
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    imported = float(result.stdout.split()[-1])
    return imported - started, None, ended - imported, None


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--repeat", type=int, default=None, help="runs of each (default 3; --quick: 1)")
    parser.add_argument(
        "--images-per-batch", type=int, default=None,
        help="images per generated batch file (default: 10,000, the real size, on a GPU; 300 on a CPU, "
        "where one epoch of the real size takes minutes; --quick: 100)",
    )
    args = parser.parse_args()
    on_gpu = bool(common.gpu_names())
    repeat = args.repeat or (1 if args.quick else 3)
    images_per_batch = args.images_per_batch or (100 if args.quick else common.FULL_IMAGES_PER_BATCH if on_gpu else 300)

    common.print_header("Trial overhead: process start -> first training step, last epoch -> result written")
    data_dir = common.ensure_data(args.data_root, images_per_batch)

    variants = [("floor: import torch + resnet18", [sys.executable, "-c", f"{FLOOR}; {PRINT_TIME}"])]
    if on_gpu:
        variants.append(("floor + CUDA context", [sys.executable, "-c", f"{FLOOR_CUDA}; {PRINT_TIME}"]))
    variants.append(("ours: main.py", common.main_command(data_dir, 1)))
    if common.orion_installed():
        variants.append(("upstream: imports orion.client", common.upstream_command(data_dir, 1)))
    if not args.quick or not common.orion_installed():
        variants.append(("upstream without the Oríon import", common.upstream_command(data_dir, 1, "--no-orion")))

    results = {name: [] for name, _ in variants}  # name -> [(first step, -> result, -> exit, written)]
    with tempfile.TemporaryDirectory(prefix="trial-overhead-") as tmp:
        for i in range(repeat):
            for v, (name, command) in enumerate(variants):
                if name.startswith("floor"):
                    results[name].append(run_floor(command, args.timeout))
                else:
                    t = common.Trial.start(name, command, Path(tmp, f"{i}-{v}")).wait(args.timeout)
                    end = t.last["end_time"]
                    results[name].append((t.start_to_first_step, t.result_wall - end if t.result_wall else None,
                                          t.ended - end, t.result_wall is not None))
                first, written, exit_, _ = results[name][-1]
                print(f"run {i + 1}/{repeat}: {name}: first step (or imports) after {first:.2f} s; last epoch -> "
                      f"result {common.fmt(written)} s, -> exit {exit_:.2f} s", flush=True)

    def medians(name):
        return [common.median(r[k] for r in results[name]) for k in range(3)]

    floor, _, floor_exit = medians(variants[0][0])
    rows = []
    for name, _ in variants:
        first, written, exit_ = medians(name)
        rows.append([
            name, first, f"{first - floor:+.2f}", written, exit_, f"{exit_ - floor_exit:+.2f}",
            "-" if name.startswith("floor") else "yes" if all(r[3] for r in results[name]) else "NO",
            len(results[name]),
        ])
    ours_first, ours_written, ours_exit = medians("ours: main.py")
    notes = [
        f"seconds, median of {repeat} run(s) each; trials train on {'cuda' if on_gpu else 'cpu'}, 1 epoch of "
        f"{int(images_per_batch * 4.5):,} images; the floor's columns: imports done, and their shutdown",
        f"target: ours' first step within 1 s of the floor: {ours_first - floor:+.2f} s, "
        f"{common.verdict(ours_first - floor <= 1)}",
        f"target: reporting to Oríon adds < 0.5 s: ours writes the result {common.fmt(ours_written)} s after the last "
        f"epoch and exits {ours_exit:.2f} s after it, {ours_exit - floor_exit:+.2f} s more than the floor's "
        f"shutdown: {common.verdict(ours_exit - floor_exit < 0.5)}",
    ]
    if "upstream: imports orion.client" in results and "upstream without the Oríon import" in results:
        with_orion = medians("upstream: imports orion.client")[0]
        without = medians("upstream without the Oríon import")[0]
        notes.append(f"upstream's `from orion.client import report_objective` costs {with_orion - without:.2f} s per trial")
    common.print_table(
        "Trial overhead",
        ["design", "start -> first step", "vs floor", "last epoch -> result", "-> exit", "vs floor", "result written", "runs"],
        rows, notes,
    )


if __name__ == "__main__":
    main()
