"""Step time: milliseconds per training step of the step main.py ships, eager against CUDA graph.

One process; for each variant main.py's arguments, a `trial_support.Trial` for them, and a
fresh model, optimizer and step built as main() builds them: `main.build_model` placed by
`trial.place`, `main.build_optimizer`, and `trial.make_step` over `main.train_step` (bf16
autocast, channels_last, fused AdamW, no cudnn.benchmark), fed as main.py's epoch loop feeds
it: batches indexed from uint8 images already on the device, the returned loss added to a sum
on the device. Variants: eager and `--cuda-graph` at batch 128 and 512; `--compile
reduce-overhead` (from an empty compile cache); and upstream's compute as a reference: float32,
contiguous, plain AdamW, through `main.train_step` (a Trial with bf16 and channels_last turned
off; upstream_main.py has no step function to import: its step is written inline in its epoch
loop; its three `.item()` per step and its DataLoader are not timed here, see epoch_time.py for
the whole of it).

For each variant: the first --warmup steps, timed together (the graph's eager steps and
capture, compilation), then the steady state (mean of --steps steps). If batch 512 takes
about as long per step as batch 128, the step is bound by launching kernels from Python.

Needs a GPU: without one it says so and exits 0, unless --cpu (tiny batches; every variant
then runs eagerly, as main.py does on a CPU: it only proves the script works).

    uv run python benchmarks/step_time.py [--quick] [--steps 50]
"""

import functools
import os
import sys
import tempfile
import time

import common


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 50; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=5, help="steps before timing (default %(default)s; the graph "
                        "is captured at the 4th)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 50)

    common.print_header("Step time: main.py's training step, eager against CUDA graph and torch.compile")
    if not common.has_gpu_or_cpu_override("step_time", args.cpu):
        return
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="step-time-inductor-"))

    import torch

    from trial_support import Data

    def trial_for(batch, cuda_graph=False, compile=None):
        """main.py's module, args and Trial, with upstream_main.py's learning rate and weight decay."""
        options = ["--learning-rate", 5e-4, "--weight-decay", 1e-4, "--batch-size", batch]
        options += (["--cuda-graph"] if cuda_graph else []) + (["--compile", compile] if compile else [])
        return common.in_process_trial(*options)

    device = trial_for(8)[2].device  # The device main() trains on.
    if device.type != "cuda" and not args.cpu:
        sys.exit("step_time: torch sees no GPU")
    small, large = (8, 32) if device.type != "cuda" else (128, 512)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def time_steps(step, images, labels, batch, n, offset=0):
        """Seconds for `n` steps of main.py's loop: index a batch, step, add its loss to a sum on the device."""
        order = torch.randperm(len(images), device=device)
        loss_sum = torch.zeros((), device=device)
        synchronize()
        start = time.perf_counter()
        for i in range(offset, offset + n):
            index = order[(i % (len(images) // batch)) * batch:][:batch]
            loss_sum += step(images[index], labels[index])
        synchronize()
        return time.perf_counter() - start

    def variant(batch, cuda_graph=False, compile=None, upstream=False):
        torch.manual_seed(0)
        ours, main_args, trial = trial_for(batch, cuda_graph, compile)
        if upstream:  # float32 and a contiguous memory format, as upstream_main.py trains.
            trial.use_bf16, trial.memory_format = False, torch.contiguous_format
        images = torch.randint(0, 256, (8 * batch, 3, 32, 32), dtype=torch.uint8, device=device)
        labels = torch.randint(0, 10, (8 * batch,), device=device)
        # CIFAR-10's shape and classes; any mean and std time the same.
        data = Data({"inputs": images, "targets": labels, "valid_inputs": images, "valid_targets": labels,
                     "classes": 10, "mean": (128.0,) * 3, "std": (64.0,) * 3},
                    device, trial.memory_format, batch, loader_workers=0)
        model = trial.place(ours.build_model(main_args, data))
        if upstream:
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)  # upstream_main.py's
        else:
            optimizer = ours.build_optimizer(main_args, model, trial)
        step = trial.make_step(ours.train_step, model, optimizer, data)
        model.train()
        first = time_steps(step, images, labels, batch, args.warmup)
        per_step = time_steps(step, images, labels, batch, steps, offset=args.warmup) / steps
        function = step
        while isinstance(function, functools.partial):  # make_step's eager step: partials of main.train_step.
            function = function.func
        kind = getattr(function, "__name__", type(function).__name__)
        return first, per_step, kind + (" (capture failed: eager)" if getattr(step, "failed", False) else "")

    variants = [  # name, batch, options
        ("eager", small, {}),
        ("--cuda-graph", small, {"cuda_graph": True}),
        ("eager", large, {}),
        ("--cuda-graph", large, {"cuda_graph": True}),
        ("upstream's compute: fp32, contiguous, AdamW", small, {"upstream": True}),
        ("--compile reduce-overhead", small, {"compile": "reduce-overhead"}),  # Last: it may take a minute.
    ]
    rows, ms = [], {}
    for name, batch, options in variants:
        print(f"timing {name} at batch {batch}", flush=True)
        first, per_step, step_type = variant(batch, **options)
        ms[name, batch] = per_step * 1000
        rows.append([name, batch, per_step * 1000, common.fmt(batch / per_step, 0), first,
                     first - args.warmup * per_step, common.ratio(ms.get(("eager", batch)), per_step * 1000), step_type])
        torch.cuda.empty_cache() if device.type == "cuda" else None
    notes = [
        f"device: {device.type}{'' if device.type == 'cuda' else ' (no bf16 on the CPU; no graph, no compile: every variant is eager fp32)'}; "
        f"ms/step: mean of {steps} steps after {args.warmup}; first steps s: those {args.warmup}, timed together; "
        f"extra: that minus {args.warmup} steady steps (capture, compilation); x eager: eager's ms / this one's, same batch",
    ]
    for batch in (small, large):
        speedup = ms["eager", batch] / ms["--cuda-graph", batch]
        notes.append(f"batch {batch}: the graph is {speedup:.1f}x as fast as eager"
                     + (f" (target >= 5x: {common.verdict(speedup >= 5)})" if device.type == "cuda" else ""))
    common.print_table(
        "Step time",
        ["variant", "batch", "ms/step", "images/s", "first steps s", "extra s", "x eager", "step"],
        rows, notes,
    )


if __name__ == "__main__":
    main()
