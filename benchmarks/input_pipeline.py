"""Input pipeline: training batches (of 128) ready on the device per second.

Ours (the code main.py runs): the training set is loaded once as a uint8 tensor on the device
(`Trial.load_data(dataset.load)`, main.py's data set module); each batch indexes it with a
shuffled permutation and standardizes it with `Data.prepare` (optionally augments it first with
`dataset.augment`, as main.py's `train_step` does with --augment). Upstream's design: a
DataLoader over torchvision's CIFAR10 with `ToTensor`, shuffle=True, 1 and 4 workers and the
task's CPU count, each batch moved with `.to(device)`. One epoch of each; ours repeats epochs
until at least 2 s have passed (--quick: 0.2 s). Worker start-up (every epoch, upstream's
DataLoaders are not persistent) counts.

    uv run python benchmarks/input_pipeline.py [--quick] [--device cpu|cuda]
"""

import time
import warnings

import common

# More workers than CPUs is one of the configurations measured, on purpose.
warnings.filterwarnings("ignore", message="This DataLoader will create")

BATCH_SIZE = 128


def synchronize(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(torch, dataset, data, device, with_augment: bool, min_seconds: float):
    def one_epoch():
        batches = 0
        for x, y in data.train_batches(data.new_epoch_order(), 0):  # As Trial.train_one_epoch.
            x = data.prepare(dataset.augment(x) if with_augment else x)  # As main.train_step.
            batches += 1
        return batches, x, y

    one_epoch()  # Warm-up (first kernel launches, allocator).
    synchronize(torch, device)
    batches, epochs, start = 0, 0, time.perf_counter()
    while epochs == 0 or time.perf_counter() - start < min_seconds:
        batches += one_epoch()[0]
        epochs += 1
        synchronize(torch, device)
    return batches, time.perf_counter() - start


def time_upstream(torch, train_dataset, device, num_workers: int):
    from torch.utils.data import DataLoader

    loader = DataLoader(train_dataset, batch_size=BATCH_SIZE, num_workers=num_workers, shuffle=True)
    batches, start = 0, time.perf_counter()
    for batch in loader:
        x, y = tuple(item.to(device) for item in batch)
        batches += 1
    synchronize(torch, device)
    return batches, time.perf_counter() - start


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--images-per-batch", type=int, default=None,
                        help=f"images per generated batch file (default {common.FULL_IMAGES_PER_BATCH}: 45,000 training images; --quick: 200)")
    parser.add_argument("--workers", default=None,
                        help="upstream's DataLoader worker counts, comma-separated (default: 1,4 and the CPU count)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: the GPU if there is one")
    args = parser.parse_args()
    images_per_batch = args.images_per_batch or (200 if args.quick else common.FULL_IMAGES_PER_BATCH)
    workers = [int(w) for w in args.workers.split(",")] if args.workers else sorted({1, 4, common.cpu_count()})
    min_seconds = 0.2 if args.quick else 2.0

    common.print_header("Input pipeline: training batches of 128 ready on the device per second")
    data_dir = common.ensure_data(args.data_root, images_per_batch)

    import torch

    import upstream_main as upstream

    # The device and its memory format as main() picks them (the GPU if there is one), unless --device.
    ours, _, trial = common.in_process_trial("--data-dir", data_dir, "--batch-size", BATCH_SIZE)
    if args.device and args.device != trial.device.type:
        trial.device = torch.device(args.device)
        trial.memory_format = torch.channels_last if args.device == "cuda" else torch.contiguous_format
    device = trial.device
    rows = []

    start = time.perf_counter()
    data = trial.load_data(ours.dataset.load)
    synchronize(torch, device)
    load_seconds = time.perf_counter() - start
    n_train = data.train_size
    for with_augment in (False, True):
        batches, seconds = time_ours(torch, ours.dataset, data, device, with_augment, min_seconds)
        name = "ours: uint8 on the device, index + normalize" + (" + augment" if with_augment else "")
        rows.append([name, "-", batches, seconds, batches / seconds])
    del data

    train_dataset, _, _ = upstream.make_datasets(str(data_dir))
    for num_workers in workers:
        batches, seconds = time_upstream(torch, train_dataset, device, num_workers)
        rows.append(["upstream: DataLoader(CIFAR10, ToTensor)", num_workers, batches, seconds, batches / seconds])

    baseline = next((row[4] for row in rows if row[1] == 1), None)
    table = [
        [name, w, b, s, rate, rate * BATCH_SIZE, rate / baseline if baseline else None]
        for name, w, b, s, rate in rows
    ]
    notes = [
        f"device: {device.type}; {n_train:,} training images; torch threads: {torch.get_num_threads()}",
        f"ours loads the training set onto the device once per trial: {load_seconds:.2f} s (not in the rates above)",
        "upstream's rates include starting its workers, as every epoch does (persistent_workers=False)",
    ]
    if baseline:
        ours_rate = rows[0][4]
        notes.append(
            f"target: ours >= 20x upstream with 1 worker: {ours_rate / baseline:.0f}x, {common.verdict(ours_rate >= 20 * baseline)}"
        )
    common.print_table(
        "Input pipeline",
        ["pipeline", "workers", "batches", "seconds", "batches/s", "images/s", "x upstream 1 worker"],
        [[n, w, b, common.fmt(s, 2), common.fmt(r, 1), common.fmt(i, 0), common.fmt(x, 1) + "x" if x else "-"]
         for n, w, b, s, r, i, x in table],
        notes,
    )


if __name__ == "__main__":
    main()
