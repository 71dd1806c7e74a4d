"""Trial overhead: what every Oríon trial (a fresh Python process) pays before and after training.

For each design, one trial of one epoch, run as Oríon runs it (a subprocess with
$ORION_RESULTS_PATH set to an existing empty file, PYTHONUNBUFFERED=1), its output lines
timestamped as they arrive:

- start -> first step: process start -> the "ready after" line (main.py logs it just before
  the first step; upstream_main.py when the first batch is on the device);
- last epoch -> result / exit: the last "Epoch N trained in" line -> the results file written
  (its mtime) / the process gone (when Oríon reads the result);

beside the floor: a process that only runs `import torch; from torchvision.models import
resnet18` (on a GPU also: the same plus creating the CUDA context), then prints a line and
exits: its "first step" is that line, its "-> exit" the interpreter's shutdown (which every
trial pays too). Medians of --repeat runs, interleaved. Upstream imports `orion.client` at the top, if Oríon is installed; its row
without that import (--no-orion) shows what the import costs.

    uv run python benchmarks/trial_overhead.py [--quick] [--repeat 3]
"""

import sys
import tempfile
from pathlib import Path

import common

FLOOR = "import torch; from torchvision.models import resnet18"
FLOOR_CUDA = FLOOR + "; torch.zeros(1, device='cuda')"
IMPORTED = "print('imported', flush=True)"


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

    common.print_header("Trial overhead: process start -> first training step, last step -> result written")
    data_dir = common.ensure_data(args.data_root, images_per_batch)

    variants = [("floor: import torch + resnet18", "floor", [sys.executable, "-c", f"{FLOOR}; {IMPORTED}"])]
    if on_gpu:
        variants.append(("floor + CUDA context", "floor", [sys.executable, "-c", f"{FLOOR_CUDA}; {IMPORTED}"]))
    variants.append(("ours: main.py", "trial", common.main_command(data_dir, 1)))
    if common.orion_installed():
        variants.append(("upstream: imports orion.client", "trial", common.upstream_command(data_dir, 1)))
    if not args.quick or not common.orion_installed():
        variants.append(
            ("upstream without the Oríon import", "trial", common.upstream_command(data_dir, 1, "--no-orion"))
        )

    results = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="trial-overhead-") as tmp:
        for i in range(repeat):
            for v, (name, kind, command) in enumerate(variants):
                print(f"run {i + 1}/{repeat}: {name}: ", end="", flush=True)
                if kind == "floor":
                    run = common.run_timed(command, timeout=args.timeout).check(name)
                    imported, _ = run.first(r"^imported$")
                    results[name].append((imported, None, run.exit_seconds - imported, None))
                    print(f"imports done after {imported:.2f} s, exit {run.exit_seconds - imported:.2f} s later", flush=True)
                    continue
                path = common.results_file(Path(tmp), f"run{i}-variant{v}")
                run = common.run_timed(command, env=common.child_env(ORION_RESULTS_PATH=path), timeout=args.timeout)
                trial = common.parse_trial(run, name)
                written = run.seconds_of_file_write(path)
                if written is not None:
                    common.read_objective(path)  # Fails loudly if the result is not Oríon's format.
                last_epoch_line = trial.epochs[-1][3]
                results[name].append((
                    trial.ready_seconds,
                    written - last_epoch_line if written is not None else None,
                    trial.last_epoch_to_exit,
                    written is not None,
                ))
                device = trial.device
                print(
                    f"first step after {trial.ready_seconds:.2f} s; last epoch line -> result written "
                    f"{common.fmt(results[name][-1][1])} s, -> exit {trial.last_epoch_to_exit:.2f} s", flush=True
                )

    floor = common.median(r[0] for r in results[variants[0][0]])
    floor_exit = common.median(r[2] for r in results[variants[0][0]])
    rows = []
    for name, kind, _ in variants:
        runs = results[name]
        first, written = common.median(r[0] for r in runs), common.median(r[1] for r in runs)
        exit_ = common.median(r[2] for r in runs)
        rows.append([
            name, common.fmt(first), f"{first - floor:+.2f}", common.fmt(written), common.fmt(exit_),
            f"{exit_ - floor_exit:+.2f}", "-" if kind == "floor" else "yes" if all(r[3] for r in runs) else "NO",
            len(runs),
        ])
    ours = results["ours: main.py"]
    ours_first, ours_written = common.median(r[0] for r in ours), common.median(r[1] for r in ours)
    ours_exit = common.median(r[2] for r in ours)
    notes = [
        f"seconds, median of {repeat} run(s) each; trials train on {device}, 1 epoch of "
        f"{int(images_per_batch * 4.5):,} images; the floor's columns: imports done, and their shutdown",
        f"target: ours' first step within 1 s of the floor: {ours_first - floor:+.2f} s, "
        f"{common.verdict(ours_first - floor <= 1)}",
        f"target: reporting to Oríon adds < 0.5 s: ours writes the result {ours_written:.2f} s after the last "
        f"epoch's line and exits {ours_exit:.2f} s after it, {ours_exit - floor_exit:+.2f} s more than the floor's "
        f"shutdown: {common.verdict(ours_exit - floor_exit < 0.5)}",
    ]
    if "upstream: imports orion.client" in results and "upstream without the Oríon import" in results:
        with_orion = common.median(r[0] for r in results["upstream: imports orion.client"])
        without = common.median(r[0] for r in results["upstream without the Oríon import"])
        notes.append(f"upstream's `from orion.client import report_objective` costs {with_orion - without:.2f} s per trial")
    common.print_table(
        "Trial overhead",
        ["design", "start -> first step", "vs floor", "last epoch -> result", "-> exit", "vs floor", "result written", "runs"],
        rows, notes,
    )


if __name__ == "__main__":
    main()
