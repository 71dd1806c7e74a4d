"""Epoch time: seconds per training epoch of 45,000 images, and each trial's peak memory.

Ours (main.py) and upstream's design (upstream_main.py: DataLoader over torchvision's CIFAR10,
`ToTensor`, workers = the task's CPUs, float32) each run as a trial subprocess on the same
generated data, on the GPU if there is one (else the CPU), and we read the lines they log:
"Epoch N trained in X s (... images/s), validated in Y s" and "Peak memory: ...". The first
epoch pays the warm-up (cuDNN autotuning, allocator), so by default two epochs are run and
the speed-up is the last epoch's.

On a 2-core CPU one epoch of the real size takes several minutes per design: pass
--train-images (e.g. 4500) there, or --quick.

    uv run python benchmarks/epoch_time.py [--quick] [--epochs 2] [--train-images N | --images-per-batch N]
"""

import common


def main():
    parser = common.argument_parser(__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--images-per-batch", type=int, default=None,
                      help=f"images per generated batch file (default {common.FULL_IMAGES_PER_BATCH}: 45,000 "
                      "training images; --quick: 100)")
    size.add_argument("--train-images", type=int, default=None, help="about this many training images (90 %% of the data)")
    parser.add_argument("--epochs", type=int, default=None, help="default 2; --quick: 1")
    parser.add_argument("--augment", action="store_true", help="also run ours with --augment")
    args = parser.parse_args()
    if args.train_images:
        images_per_batch = common.images_per_batch_for(args.train_images)
    else:
        images_per_batch = args.images_per_batch or (100 if args.quick else common.FULL_IMAGES_PER_BATCH)
    epochs = args.epochs or (1 if args.quick else 2)

    common.print_header("Epoch time: seconds per training epoch and peak memory per trial")
    data_dir = common.ensure_data(args.data_root, images_per_batch)

    designs = [("ours: main.py", common.main_command(data_dir, epochs))]
    if args.augment:
        designs.append(("ours: main.py --augment", common.main_command(data_dir, epochs, "--augment")))
    designs.append(("upstream: DataLoader + ToTensor, fp32", common.upstream_command(data_dir, epochs)))

    trials = {}
    for name, command in designs:
        print(f"running {name}: {' '.join(map(str, command[1:]))}", flush=True)
        trials[name] = common.parse_trial(common.run_timed(command, timeout=args.timeout), name)

    rows = []
    for name, trial in trials.items():
        for epoch, (train_s, images_s, valid_s, _) in enumerate(trial.epochs):
            rows.append([
                name if epoch == 0 else "", trial.device, epoch, common.fmt(train_s), common.fmt(images_s, 0),
                common.fmt(valid_s), common.fmt(trial.ready_seconds, 1) if epoch == 0 else "",
                common.fmt(trial.peak_host_gib) + (
                    f" (+{trial.worker_peak_host_gib:.2f}/worker)" if trial.worker_peak_host_gib and epoch == 0 else ""
                ) if epoch == 0 else "",
                common.fmt(trial.peak_gpu_gib) if epoch == 0 else "",
            ])
    ours, upstream = trials[designs[0][0]], trials[designs[-1][0]]
    speedup = upstream.epochs[-1][0] / ours.epochs[-1][0]
    target = 10 if ours.device == "cuda" else None
    notes = [
        f"{ours.train_images:,} training and {int(images_per_batch * 0.5):,} validation images, batch 128; "
        f"start -> 1st step: seconds from process start to the first training step",
        "peak host memory: the trial's main process (ru_maxrss); upstream's DataLoader workers are processes of their "
        "own (forked, sharing most pages), the largest one's peak in brackets",
        f"last epoch: ours trains {speedup:.1f}x as fast as upstream's design on {ours.device}"
        + (f" (target >= {target}x on a GPU: {common.verdict(speedup >= target)})" if target else
           " (the >= 10x target is for a GPU)"),
    ]
    if epochs >= 2:
        def trial_seconds(trial):  # First epoch (warm-up included) + 9 epochs at the last epoch's speed.
            return trial.epochs[0][0] + 9 * trial.epochs[-1][0]
        notes.append(
            f"10 epochs (main.py's default) at these speeds: ours {trial_seconds(ours):.0f} s, upstream "
            f"{trial_seconds(upstream):.0f} s of training (first epoch + 9 x last)"
        )
    common.print_table(
        "Epoch time",
        ["design", "device", "epoch", "train s", "images/s", "validate s", "start -> 1st step s", "peak host GiB",
         "peak GPU GiB"],
        rows, notes,
    )


if __name__ == "__main__":
    main()
