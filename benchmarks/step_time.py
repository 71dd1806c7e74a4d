"""Step time: where one training step's time goes, and what cuDNN's autotuner costs per new shape.

One process, one fresh ResNet18 per variant, random uint8 batches already on the device and
main.py's `normalize`, then main.py's step (bf16 autocast, channels_last, AdamW) or upstream's
compute (float32, contiguous), with `torch.backends.cudnn.benchmark` off or on (main.py turns
it on), at batch 128 and 512. For each variant: the first step at each batch size (cuDNN
autotunes a shape it has not seen before, when benchmark is on) and the steady-state time
per step (mean of --steps steps after 5 warm-up steps). The variants run in this order in one
process: a shape already seen by an earlier variant is not autotuned again.

If batch 512 takes about as long per step as batch 128, the step is bound by launching
kernels from Python, not by the GPU's arithmetic: precision and memory format then change
nothing, and only fewer launches (CUDA graphs, torch.compile) or more work per launch (larger
batches, several trials per GPU) go faster.

Needs a GPU: without one it says so and exits 0, unless --cpu (tiny, to test the script).

    uv run python benchmarks/step_time.py [--quick] [--steps 40]
"""

import sys
import time

import common


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 40; --quick: 3)")
    parser.add_argument("--cpu", action="store_true", help="without a GPU, run on the CPU anyway (to test this script)")
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 40)

    common.print_header("Step time: one training step of ResNet18, and the first step at each new shape")
    if not common.has_gpu_or_cpu_override("step_time", args.cpu):
        return

    import torch
    import torch.nn.functional as F
    from torchvision.models import resnet18

    import main as ours

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.cpu:
        sys.exit("step_time: torch sees no GPU")

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # Load cuDNN/cuBLAS once, with a shape no variant uses.
    conv = torch.nn.Conv2d(3, 8, 3).to(device)
    conv(torch.randn(2, 3, 9, 9, device=device)).sum().backward()
    synchronize()

    def variant(bf16, memory_format, benchmark, batch, first_batches):
        torch.backends.cudnn.benchmark = benchmark
        torch.manual_seed(0)
        model = resnet18(num_classes=10).to(device, memory_format=memory_format)
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)

        def step(size):
            images = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8, device=device)
            labels = torch.randint(0, 10, (size,), device=device)
            x = ours.normalize(images, memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        firsts = []
        for size in first_batches:
            synchronize()
            start = time.perf_counter()
            step(size)
            synchronize()
            firsts.append(f"{size}: {time.perf_counter() - start:.2f}")
        for _ in range(5):
            step(batch)
        synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step(batch)
        synchronize()
        per_step = (time.perf_counter() - start) / steps
        # main.py validates in batches of 500: the first forward pass at that shape.
        model.eval()
        with torch.no_grad():
            synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda"):
                model(ours.normalize(torch.zeros(500, 3, 32, 32, dtype=torch.uint8, device=device), memory_format))
            synchronize()
            first_eval = time.perf_counter() - start
        return [per_step * 1000, batch / per_step, ", ".join(firsts), first_eval]

    cl, cf = torch.channels_last, torch.contiguous_format
    variants = [  # name, bf16, memory format, cudnn.benchmark, batch, first steps at
        ("ours: bf16 + channels_last, benchmark off", True, cl, False, 128, (128, 72)),
        ("upstream's compute: fp32, benchmark off", False, cf, False, 128, (128,)),
        ("ours: bf16 + channels_last, benchmark on", True, cl, True, 128, (128, 72)),
        ("ours, benchmark on, batch 512", True, cl, True, 512, (512,)),
        ("fp32, benchmark on", False, cf, True, 128, (128, 72)),
    ]
    rows = []
    for name, bf16, memory_format, benchmark, batch, first_batches in variants:
        print(f"timing {name}", flush=True)
        per_step_ms, images_s, firsts, first_eval = variant(bf16, memory_format, benchmark, batch, first_batches)
        rows.append([name, batch, common.fmt(per_step_ms, 1), common.fmt(images_s, 0), firsts, common.fmt(first_eval)])
    common.print_table(
        "Step time",
        ["variant", "batch", "ms/step", "images/s", "first step s, by batch size", "first eval (500) s"],
        rows,
        [f"device: {device.type}{' (no bf16 autocast on the CPU: every variant is fp32)' if device.type != 'cuda' else ''}; "
         f"steady state: mean of {steps} steps; variants in this order, in one process"],
    )


if __name__ == "__main__":
    main()
