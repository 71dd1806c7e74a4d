"""Epoch and trial time: main.py (eager, --cuda-graph, --compile reduce-overhead) against upstream's design.

Each design runs as one trial subprocess of --epochs epochs (default 10, main.py's default,
on a GPU) on the same generated data, as Oríon runs it, and we read its metrics.jsonl:
each epoch's train seconds; the first epoch's extra cost (epoch 0 minus the median of the
later ones: warm-up, graph capture, compilation); the whole trial, from process start to
the objective written (the results file's mtime); peak memory. Speed-ups are upstream's
seconds / ours. --compile starts from an empty compile cache (a fresh
$TORCHINDUCTOR_CACHE_DIR), as a trial on a fresh node would. Upstream's design:
upstream_main.py (DataLoader over torchvision's CIFAR10, `ToTensor`, workers = the task's
CPUs, float32). The graph and compile variants need a GPU: without one they are left out,
unless --cpu (main.py then warns and trains eagerly: only proves the script works).

On a 2-core CPU one epoch of the real size takes minutes per design: pass --train-images
(e.g. 4500) and --epochs 2 there, or --quick.

    uv run python benchmarks/epoch_time.py [--quick] [--epochs 10] [--train-images N | --images-per-batch N]
"""

import tempfile
from pathlib import Path

import common


def main():
    parser = common.argument_parser(__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--images-per-batch", type=int, default=None,
                      help=f"images per generated batch file (default {common.FULL_IMAGES_PER_BATCH}: 45,000 "
                      "training images; --quick: 100)")
    size.add_argument("--train-images", type=int, default=None, help="about this many training images (90 %% of the data)")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 on a GPU, 2 on a CPU and with --quick")
    parser.add_argument("--augment", action="store_true", help="also run ours with --augment")
    args = parser.parse_args()
    if args.train_images:
        images_per_batch = common.images_per_batch_for(args.train_images)
    else:
        images_per_batch = args.images_per_batch or (100 if args.quick else common.FULL_IMAGES_PER_BATCH)
    on_gpu = bool(common.gpu_names())
    epochs = args.epochs or (10 if on_gpu and not args.quick else 2)

    common.print_header("Epoch and trial time: main.py's variants against upstream's design")
    data_dir = common.ensure_data(args.data_root, images_per_batch)

    # Most wanted first: a run cut short by a time limit keeps the lines printed so far.
    # (name, main.py's options; None: upstream_main.py)
    designs = [("ours: main.py --cuda-graph", ["--cuda-graph"]), ("upstream", None), ("ours: main.py", []),
               ("ours: main.py --compile reduce-overhead", ["--compile", "reduce-overhead"])]
    if args.augment:
        designs.append(("ours: main.py --cuda-graph --augment", ["--cuda-graph", "--augment"]))
    if not (on_gpu or args.cpu):
        print("no GPU: leaving out --cuda-graph and --compile (they need one; --cpu runs them anyway)")
        designs = [(name, options) for name, options in designs if not {"--cuda-graph", "--compile"} & set(options or [])]

    trials = {}
    with tempfile.TemporaryDirectory(prefix="epoch-time-") as tmp:
        for i, (name, options) in enumerate(designs):
            command = (common.upstream_command(data_dir, epochs) if options is None
                       else common.main_command(data_dir, epochs, *options))
            env = {"TORCHINDUCTOR_CACHE_DIR": Path(tmp, f"inductor-{i}")} if "--compile" in (options or []) else {}
            trial = trials[name] = common.run_trial(name, command, Path(tmp, str(i)), args.timeout, **env)
            print(f"  {name}: train s per epoch {', '.join(f'{s:.2f}' for s in trial.train_seconds)}; "
                  f"start -> objective {common.fmt(trial.start_to_objective, 1)} s", flush=True)

    upstream = trials["upstream"]
    rows, notes = [], []
    for name, trial in trials.items():
        later = common.median(trial.train_seconds[1:])
        trial_s = trial.start_to_objective
        rows.append([
            name, trial.last["device"], trial.train_seconds[0], later,
            trial.train_seconds[0] - later if later is not None else None,
            common.fmt(common.median(e["examples_per_second"] for e in trial.epochs[1:] or trial.epochs), 0),
            common.median(e["val_seconds"] for e in trial.epochs), common.fmt(trial.start_to_first_step, 1),
            common.fmt(trial_s, 1), common.ratio(common.median(upstream.train_seconds[1:]), later),
            common.ratio(upstream.start_to_objective, trial_s),
            common.fmt(trial.last["peak_host_gib"]) + (f" (+{trial.last['peak_worker_host_gib']:.2f}/worker)"
                                                       if trial.last.get("peak_worker_host_gib") else ""),
            trial.last["peak_gpu_gib"],
        ])
        if name != "upstream" and trial.last["device"] == "cuda" and later and trial_s:
            epoch_x, trial_x = common.median(upstream.train_seconds[1:]) / later, upstream.start_to_objective / trial_s
            notes.append(f"{name}: epoch {epoch_x:.1f}x (target >= 5x: {common.verdict(epoch_x >= 5)}), "
                         f"whole trial {trial_x:.1f}x (target >= 3x: {common.verdict(trial_x >= 3)}) upstream's speed")
    notes = [
        f"{upstream.last['train_examples']:,} training and {upstream.last['valid_examples']:,} validation images, batch 128, {epochs} "
        "epoch(s); seconds; later epochs: median of epochs 1..N-1; first-epoch extra: epoch 0 minus that median",
        "start -> 1st step / -> objective: from the process's start to its first training step / to the results "
        "file written; x upstream: upstream's seconds / ours (later epochs' train s; whole trial)",
        "ours saves a checkpoint after every epoch, as in an Oríon trial (in the whole trial's time); upstream has "
        "none, and " + ("imports orion.client" if common.orion_installed() else "reports without Oríon (not installed)"),
        "peak host memory: the trial's main process (ru_maxrss); upstream's DataLoader workers are processes of "
        "their own (forked, sharing most pages), the largest one's peak in brackets",
        *notes,
    ]
    common.print_table(
        "Trial time",
        ["design", "device", "epoch 0 train s", "later epochs s", "first-epoch extra s", "images/s", "validate s",
         "start -> 1st step s", "start -> objective s", "epoch x upstream", "trial x upstream", "peak host GiB",
         "peak GPU GiB"],
        rows, notes,
    )
    common.print_table(
        "Train seconds by epoch", ["epoch", *trials],
        [[epoch, *(t.train_seconds[epoch] if epoch < len(t.epochs) else None for t in trials.values())]
         for epoch in range(epochs)],
    )


if __name__ == "__main__":
    main()
