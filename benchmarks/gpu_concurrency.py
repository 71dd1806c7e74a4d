"""GPU concurrency: aggregate training images/s of 1, 2 and 5 main.py trials sharing one GPU.

Upstream's job script runs five Oríon workers, so five trials, on one GPU. Each trial is a
main.py subprocess (its own seed and results file), all started at once; we read the lines
they log. Two aggregates:

- wall: every trial's training images / the span from the first trial's first step to the
  last trial's last epoch line (counts start-up skew and validation: a lower bound);
- sum: the sum of each trial's last-epoch images/s (assumes the trials fully overlap).

Needs a GPU. Without one it says so and exits 0; with --cpu it runs the same code on the CPU
(tiny data with --quick) to prove that it works: its numbers mean nothing about a GPU.

    uv run python benchmarks/gpu_concurrency.py [--quick] [--trials 1,2,5] [--epochs 3]
"""

import sys
import tempfile
from pathlib import Path

import common


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--trials", default=None, help="concurrent trial counts, comma-separated (default 1,2,5; --quick: 1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 3; --quick: 1)")
    parser.add_argument("--images-per-batch", type=int, default=None,
                        help=f"images per generated batch file (default {common.FULL_IMAGES_PER_BATCH}: 45,000 "
                        "training images; --quick: 100)")
    parser.add_argument("--cpu", action="store_true", help="without a GPU, run on the CPU anyway (to test this script)")
    args = parser.parse_args()
    counts = [int(n) for n in (args.trials or ("1,2" if args.quick else "1,2,5")).split(",")]
    epochs = args.epochs or (1 if args.quick else 3)
    images_per_batch = args.images_per_batch or (100 if args.quick else common.FULL_IMAGES_PER_BATCH)

    common.print_header("GPU concurrency: aggregate images/s of concurrent main.py trials on one GPU")
    if not common.has_gpu_or_cpu_override("gpu_concurrency", args.cpu):
        return
    data_dir = common.ensure_data(args.data_root, images_per_batch)

    rows, single_rate = [], None
    with tempfile.TemporaryDirectory(prefix="gpu-concurrency-") as tmp:
        for count in counts:
            print(f"running {count} concurrent trial(s) of {epochs} epoch(s)", flush=True)
            processes = [
                common.TimedProcess(
                    common.main_command(data_dir, epochs, "--seed", seed),
                    env=common.child_env(ORION_RESULTS_PATH=common.results_file(Path(tmp), f"{count}-{seed}")),
                    timeout=args.timeout,
                )
                for seed in range(count)
            ]
            trials = [common.parse_trial(p.wait(), f"trial {i} of {count}") for i, p in enumerate(processes)]
            devices = {t.device for t in trials}
            if devices != {"cuda"} and not args.cpu:
                sys.exit(f"gpu_concurrency: the trials trained on {', '.join(devices)}, not on the GPU")
            # Times are relative to each process's start; all started within milliseconds.
            offsets = [p.start - processes[0].start for p in processes]
            first_step = min(t.ready_seconds + o for t, o in zip(trials, offsets))
            last_epoch = max(t.epochs[-1][3] + o for t, o in zip(trials, offsets))
            images = sum(t.train_images * len(t.epochs) for t in trials)
            wall_rate = images / (last_epoch - first_step)
            sum_rate = sum(t.epochs[-1][1] for t in trials)
            single_rate = single_rate or (sum_rate if count == 1 else None)
            rows.append([
                count, devices.pop(), common.fmt(last_epoch - first_step, 1), common.fmt(wall_rate, 0),
                common.fmt(sum_rate, 0), f"{sum_rate / single_rate:.2f}x" if single_rate else "-",
                common.fmt(common.median(t.epochs[-1][0] for t in trials)),
                common.fmt(max(t.peak_gpu_gib for t in trials)), common.fmt(max(t.peak_host_gib for t in trials)),
            ])
    common.print_table(
        "GPU concurrency",
        ["trials", "device", "wall s", "wall images/s", "sum images/s", "sum vs 1 trial", "last epoch s (median)",
         "peak GPU GiB/trial", "peak host GiB/trial"],
        rows,
        [f"{trials[0].train_images:,} training images per trial, {epochs} epoch(s); wall: from the first trial's first "
         "step to the last trial's last epoch; sum: of the trials' last-epoch images/s"],
    )


if __name__ == "__main__":
    main()
