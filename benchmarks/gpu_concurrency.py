"""GPU concurrency: aggregate training images/s of 1 and 5 main.py trials sharing one GPU.

Upstream's job script runs five Oríon workers, so five trials, on one GPU. Each trial is a
main.py subprocess (its own seed, results file and metrics.jsonl), all started at once.
Options this script does not know go to every main.py, e.g. `--cuda-graph`. Two aggregates:

- wall: every trial's trained images / the span from the first trial's first step to the
  last trial's last epoch end (counts start-up skew and validation: a lower bound);
- sum: the sum of each trial's last-epoch images/s (assumes the trials fully overlap).

Needs a GPU. Without one it says so and exits 0; with --cpu it runs the same code on the CPU
(tiny data with --quick) to prove that it works: its numbers mean nothing about a GPU.

    uv run python benchmarks/gpu_concurrency.py [--quick] [--trials 1,5] [--epochs 3] [MAIN.PY OPTIONS, e.g. --cuda-graph]
"""

import sys
import tempfile
from pathlib import Path

import common


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--trials", default=None, help="concurrent trial counts, comma-separated (default 1,5; --quick: 1,2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default 3; --quick: 1)")
    parser.add_argument("--images-per-batch", type=int, default=None,
                        help=f"images per generated batch file (default {common.FULL_IMAGES_PER_BATCH}: 45,000 "
                        "training images; --quick: 100)")
    args, main_options = parser.parse_known_args()
    counts = [int(n) for n in (args.trials or ("1,2" if args.quick else "1,5")).split(",")]
    epochs = args.epochs or (1 if args.quick else 3)
    images_per_batch = args.images_per_batch or (100 if args.quick else common.FULL_IMAGES_PER_BATCH)

    common.print_header("GPU concurrency: aggregate images/s of concurrent main.py trials on one GPU")
    if not common.has_gpu_or_cpu_override("gpu_concurrency", args.cpu):
        return
    data_dir = common.ensure_data(args.data_root, images_per_batch)

    rows, single_rate = [], None
    with tempfile.TemporaryDirectory(prefix="gpu-concurrency-") as tmp:
        for count in counts:
            print(f"running {count} concurrent trial(s) of {epochs} epoch(s), main.py {' '.join(main_options)}", flush=True)
            started = [
                common.Trial.start(f"trial {seed} of {count}", common.main_command(data_dir, epochs, "--seed", seed,
                                                                                   *main_options), Path(tmp, f"{count}-{seed}"))
                for seed in range(count)
            ]
            trials = [trial.wait(args.timeout) for trial in started]
            devices = {t.last["device"] for t in trials}
            if devices != {"cuda"} and not args.cpu:
                sys.exit(f"gpu_concurrency: the trials trained on {', '.join(devices)}, not on the GPU")
            span = max(t.last["end_time"] for t in trials) - min(t.first_step_wall for t in trials)
            images = sum(e["trained_examples"] for t in trials for e in t.epochs)
            sum_rate = sum(t.last["examples_per_second"] for t in trials)
            single_rate = single_rate or (sum_rate if count == 1 else None)
            rows.append([
                count, devices.pop(), common.fmt(span, 1), common.fmt(images / span, 0), common.fmt(sum_rate, 0),
                common.ratio(sum_rate, single_rate), common.median(t.last["train_seconds"] for t in trials),
                max(t.last["peak_gpu_gib"] for t in trials), max(t.last["peak_host_gib"] for t in trials),
            ])
    common.print_table(
        "GPU concurrency",
        ["trials", "device", "wall s", "wall images/s", "sum images/s", "sum vs 1 trial", "last epoch s (median)",
         "peak GPU GiB/trial", "peak host GiB/trial"],
        rows,
        [f"{trials[0].last['train_examples']:,} training images per trial, {epochs} epoch(s), main.py "
         f"{' '.join(main_options) or '(defaults)'}; wall: from the first trial's first step to the last trial's "
         "last epoch end; sum: of the trials' last-epoch images/s"],
    )


if __name__ == "__main__":
    main()
