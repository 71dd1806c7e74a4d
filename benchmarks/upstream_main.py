"""Upstream's design, for the benchmarks: mila-docs' `hpo_with_orion` example main.py.

Reproduces its training script as it is (Oríon imported at the top, torchvision's CIFAR10
with `ToTensor`, `random_split` 45k/5k with seed 42, DataLoaders with `num_workers` = the
task's CPUs and `shuffle=True`, ResNet18 in float32, AdamW, a `.item()` per step for the
progress bar and the debug logs, the validation loss summed over batches,
`report_objective(1 - val_accuracy)`), with these changes, each marked `# BENCHMARK:`:

- `--data-dir` (upstream: $SLURM_TMPDIR/data, else ./data) and `download=False` (no internet
  on the GPU machines); CIFAR10 subclassed without the official files' MD5s, so that it
  reads the generated look-alike (file names and format are the official ones).
- `--no-orion`: report with Oríon's results-file protocol (what `orion.client` writes) instead
  of importing Oríon, on machines without it.
- `--num-workers` (default: upstream's `get_num_workers()`), `--device` (default: the GPU;
  upstream asserts there is one, we fall back to the CPU).
- `--checkpoint-dir DIR`: writes DIR/metrics.jsonl, one JSON line per epoch in main.py's
  format, so that the benchmarks read both designs alike (there are no checkpoints: upstream
  has none). Its `ready_seconds` is main()'s start -> the first batch on the device; its
  `train_loss` is null (upstream keeps none), its `val_loss` upstream's sum over batches.
- rich and tqdm are optional (the logs are plain without rich, the progress bar is off
  anyway in non-interactive runs).

    python benchmarks/upstream_main.py --data-dir DATA --epochs 1 [--no-orion] [--checkpoint-dir DIR]
"""

import argparse
import json
import logging
import math  # BENCHMARK
import os
import resource  # BENCHMARK: peak memory
import sys
import time  # BENCHMARK: timings
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, random_split
from torchvision import transforms
from torchvision.datasets import CIFAR10
from torchvision.models import resnet18

try:  # BENCHMARK: optional
    import rich.console
    import rich.logging
except ImportError:
    rich = None
try:  # BENCHMARK: optional
    from tqdm import tqdm
except ImportError:
    class tqdm:  # noqa: N801 - stands in for tqdm (disabled), same calls.
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n=1):
            pass

        def set_postfix(self, *args, **kwargs):
            pass

        def close(self):
            pass


def report_objective_without_orion(objective, name="objective"):
    """BENCHMARK: what `orion.client.report_objective` does, without importing Oríon."""
    data = [dict(name=name, type="objective", value=objective)]
    if os.environ.get("ORION_RESULTS_PATH"):
        with open(os.environ["ORION_RESULTS_PATH"], "w", encoding="utf8") as results_file:
            json.dump(data, results_file)
    else:
        print(data)


# Upstream: `from orion.client import report_objective`, at the top. (Not when this file is
# imported as a module by the input-pipeline benchmark, nor with --no-orion.)
if __name__ == "__main__" and "--no-orion" not in sys.argv[1:]:
    from orion.client import report_objective
else:
    report_objective = report_objective_without_orion


class CIFAR10LookAlike(CIFAR10):
    """BENCHMARK: torchvision's CIFAR10 without the official files' MD5s (it still checks they exist)."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


def main():
    start_time = time.perf_counter()  # BENCHMARK
    # Add an argument parser so that we can pass hyperparameters from command line.
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    # BENCHMARK: the options below are not upstream's.
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("SLURM_TMPDIR", ".")) / "data")
    parser.add_argument("--num-workers", type=int, default=None, help="default: upstream's get_num_workers()")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-orion", action="store_true", help="report without importing Oríon")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="where to write metrics.jsonl")
    args = parser.parse_args()

    epochs = args.epochs
    learning_rate = args.learning_rate
    weight_decay = args.weight_decay
    batch_size = args.batch_size

    # Check that the GPU is available
    if args.device == "cuda":  # BENCHMARK: upstream always asserts.
        assert torch.cuda.is_available() and torch.cuda.device_count() > 0
        device = torch.device("cuda", 0)
    else:
        device = torch.device("cpu")

    # Setup logging (optional, but much better than using print statements)
    # Uses the `rich` package to make logs pretty.
    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        handlers=[
            rich.logging.RichHandler(
                markup=True,
                console=rich.console.Console(
                    # Allower wider log lines in sbatch output files than on the terminal.
                    width=120 if not sys.stdout.isatty() else None
                ),
            )
        ] if rich is not None else None,  # BENCHMARK: plain logs without rich.
    )

    logger = logging.getLogger(__name__)

    logger.info(f"Args: {json.dumps(vars(args), indent=1, default=str)}")

    # Create a model and move it to the GPU.
    model = resnet18(num_classes=10)
    model.to(device=device)

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=weight_decay
    )

    # Setup CIFAR10
    num_workers = get_num_workers() if args.num_workers is None else args.num_workers
    dataset_path = args.data_dir  # BENCHMARK: upstream: Path(os.environ.get("SLURM_TMPDIR", ".")) / "data"
    train_dataset, valid_dataset, test_dataset = make_datasets(str(dataset_path))
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=True,
    )
    valid_dataloader = DataLoader(
        valid_dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    test_dataloader = DataLoader(  # NOTE: Not used in this example.  # noqa: F841
        test_dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )

    # Checkout the "checkpointing and preemption" example for more info!
    logger.debug("Starting training from scratch.")
    ready_seconds, history = None, []  # BENCHMARK


    for epoch in range(epochs):
        logger.debug(f"Starting epoch {epoch}/{epochs}")

        # Set the model in training mode (important for e.g. BatchNorm and Dropout layers)
        model.train()
        epoch_start = time.perf_counter()  # BENCHMARK

        # NOTE: using a progress bar from tqdm because it's nicer than using `print`.
        progress_bar = tqdm(
            total=len(train_dataloader),
            desc=f"Train epoch {epoch}",
            disable=not sys.stdout.isatty(),  # Disable progress bar in non-interactive environments.
        )

        # Training loop
        for batch in train_dataloader:
            # Move the batch to the GPU before we pass it to the model
            batch = tuple(item.to(device) for item in batch)
            x, y = batch
            if ready_seconds is None:  # BENCHMARK: the first batch is on the device.
                ready_seconds = time.perf_counter() - start_time

            # Forward pass
            logits: Tensor = model(x)

            loss = F.cross_entropy(logits, y)

            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

            # Calculate some metrics:
            n_correct_predictions = logits.detach().argmax(-1).eq(y).sum()
            n_samples = y.shape[0]
            accuracy = n_correct_predictions / n_samples

            logger.debug(f"Accuracy: {accuracy.item():.2%}")
            logger.debug(f"Average Loss: {loss.item()}")

            # Advance the progress bar one step and update the progress bar text.
            progress_bar.update(1)
            progress_bar.set_postfix(loss=loss.item(), accuracy=accuracy.item())
        progress_bar.close()
        if device.type == "cuda":  # BENCHMARK: the last step's optimizer update is done too.
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - epoch_start  # BENCHMARK

        val_loss, val_accuracy = validation_loop(model, valid_dataloader, device)
        logger.info(
            f"Epoch {epoch}: Val loss: {val_loss:.3f} accuracy: {val_accuracy:.2%}"
        )
        if args.checkpoint_dir:  # BENCHMARK: main.py's metrics.jsonl.
            history.append({
                "epoch": epoch, "train_loss": None, "val_loss": val_loss, "val_accuracy": val_accuracy.item(),
                "train_seconds": train_seconds, "val_seconds": time.perf_counter() - epoch_start - train_seconds,
                "examples_per_second": len(train_dataset) / train_seconds, "trained_examples": len(train_dataset),
                "train_examples": len(train_dataset), "valid_examples": len(valid_dataset),
                "ready_seconds": ready_seconds, "seconds_since_start": time.perf_counter() - start_time,
                "device": device.type,
                "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "peak_gpu_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0,
                # Each DataLoader worker is a process of its own (forked, sharing most pages): the largest one's peak.
                "peak_worker_host_gib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20,
                "diverged": not math.isfinite(val_loss), "end_time": time.time(),
            })
            args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (args.checkpoint_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))

    # We report to Orion the objective that we want to minimize.
    report_objective(1 - val_accuracy.item())

    print("Done!")


@torch.no_grad()
def validation_loop(model: nn.Module, dataloader: DataLoader, device: torch.device):
    model.eval()

    total_loss = 0.0
    n_samples = 0
    correct_predictions = 0

    for batch in dataloader:
        batch = tuple(item.to(device) for item in batch)
        x, y = batch

        logits: Tensor = model(x)
        loss = F.cross_entropy(logits, y)

        batch_n_samples = x.shape[0]
        batch_correct_predictions = logits.argmax(-1).eq(y).sum()

        total_loss += loss.item()
        n_samples += batch_n_samples
        correct_predictions += batch_correct_predictions

    accuracy = correct_predictions / n_samples
    return total_loss, accuracy


def make_datasets(
    dataset_path: str,
    val_split: float = 0.1,
    val_split_seed: int = 42,
):
    """Returns the training, validation, and test splits for CIFAR10.

    NOTE: We don't use image transforms here for simplicity.
    Having different transformations for train and validation would complicate things a bit.
    Later examples will show how to do the train/val/test split properly when using transforms.
    """
    # BENCHMARK: CIFAR10LookAlike and download=False; upstream: CIFAR10(..., download=True).
    train_dataset = CIFAR10LookAlike(
        root=dataset_path, transform=transforms.ToTensor(), download=False, train=True
    )
    test_dataset = CIFAR10LookAlike(
        root=dataset_path, transform=transforms.ToTensor(), download=False, train=False
    )
    # Split the training dataset into a training and validation set.
    n_samples = len(train_dataset)
    n_valid = int(val_split * n_samples)
    n_train = n_samples - n_valid
    train_dataset, valid_dataset = random_split(
        train_dataset, (n_train, n_valid), torch.Generator().manual_seed(val_split_seed)
    )
    return train_dataset, valid_dataset, test_dataset


def get_num_workers() -> int:
    """Gets the optimal number of DatLoader workers to use in the current job."""
    if "SLURM_CPUS_PER_TASK" in os.environ:
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return torch.multiprocessing.cpu_count()


if __name__ == "__main__":
    main()
