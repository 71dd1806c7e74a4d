"""Streaming from disk: training batches (of 128) ready on the device per second, ours against
upstream's design, on the same folder of photos and with the same number of worker processes.

Ours: the photos module of docs/make-it-yours.md (its worked example, taken as the tests take it):
torchvision's ImageFolder decodes and resizes each photo to a uint8 tensor in DataLoader workers;
trial_support.Data serves the batches in the epoch's checkpointed order (persistent workers, pinned
memory on a GPU) and `Data.prepare` standardizes each batch on the device, as main.py's train_step
does. Upstream's design: the same ImageFolder with `ToTensor` and `Normalize` in the workers
(float32 batches), a DataLoader with shuffle=True, workers started anew every epoch, each batch
moved with `.to(device)`. Each runs --epochs epochs; the table gives batches per second over all
of them (worker start-up included) and over the last one.

    uv run python benchmarks/streaming.py [--quick] [--photos 3000] [--workers 1 2 4] [--device cpu|cuda]
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common

BATCH_SIZE = 128


def photos_module(folder: Path):
    """docs/make-it-yours.md's photos.py, written to `folder` and imported."""
    from test_make_it_yours import worked_example

    name, code, _, _ = worked_example("a folder of photos")
    (folder / f"{name}.py").write_text(code)
    sys.path.insert(0, str(folder))
    import photos

    return photos


def time_epochs(epochs: int, one_epoch) -> tuple[float, float, int]:
    """(seconds for all epochs, seconds for the last, batches per epoch)."""
    start = time.perf_counter()
    for _ in range(epochs):
        last = time.perf_counter()
        batches = one_epoch()
    end = time.perf_counter()
    return end - start, end - last, batches


def main() -> None:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--photos", type=int, default=3000, help="photos in the generated folder (64 x ~64 PNG)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="DataLoader worker counts (default: 1, 2, and this machine's CPU count)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args()
    if args.photos < 2 * BATCH_SIZE or args.epochs < 1 or any(w < 0 for w in args.workers or []):
        raise SystemExit(f"error: --photos must be at least {2 * BATCH_SIZE}, --epochs positive, --workers >= 0")
    photos_count, epochs = (300, 1) if args.quick else (args.photos, args.epochs)
    workers = args.workers or sorted({1, 2, common.cpu_count()})
    common.print_header("Streaming from disk: batches per second, ours against upstream's DataLoader", args)

    import torch
    from torchvision import datasets, transforms
    from trial_support import Data

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    folder = Path(tempfile.mkdtemp(prefix="streaming-"))
    rows = []
    try:
        photos = photos_module(folder)
        photos.write_sample(folder / "data", photos_count)
        mean, std = [m / 255 for m in photos.MEAN], [s / 255 for s in photos.STD]
        for count in workers:
            loaded = photos.load(folder / "data")
            data = Data(loaded, device, torch.channels_last if device.type == "cuda" else torch.contiguous_format,
                        BATCH_SIZE, count)

            def ours():
                batches = 0
                for inputs, _ in data.train_batches(data.new_epoch_order(), 0):
                    data.prepare(inputs)
                    batches += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return batches

            total, last, batches = time_epochs(epochs, ours)
            rows.append(["ours: uint8 in workers, standardized on the device", count, batches,
                         batches * epochs / total, batches / last])
            data.close()
            upstream_set = datasets.ImageFolder(folder / "data" / "photos" / "train", transform=transforms.Compose([
                transforms.Resize(photos.SIZE), transforms.CenterCrop(photos.SIZE), transforms.ToTensor(),
                transforms.Normalize(mean, std)]))
            loader = torch.utils.data.DataLoader(upstream_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=count)

            def upstream():
                batches = 0
                for inputs, targets in loader:
                    inputs.to(device), targets.to(device)
                    batches += 1
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return batches

            total, last, batches = time_epochs(epochs, upstream)
            rows.append(["upstream: ToTensor + Normalize in workers", count, batches, batches * epochs / total,
                         batches / last])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    common.print_table(
        f"{photos_count} PNG photos (~64 x 64, resized to 48 x 48), {device.type}, batch {BATCH_SIZE}, {epochs} epoch(s)",
        ["pipeline", "workers", "batches/epoch", "batches/s (all)", "batches/s (last epoch)"], rows,
        notes=["ours holds the training split (5/6 of the photos: the sample brings its own val/); upstream's "
               "ImageFolder reads the same train/ folder"])


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
