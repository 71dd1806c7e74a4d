"""Train torchvision's ResNet18 on CIFAR-10 and report `1 - validation accuracy` to Oríon.

Run by `orion hunt` (see job.sh), once per trial, with the trial's hyperparameters on the
command line. Runs just as well by hand, on a GPU or (slowly) on a CPU:

    uv run python main.py --data-dir ./data --epochs 1

The script, top to bottom: command line -> data (loaded once, kept on the GPU as uint8)
-> model and optimizer -> resume from a checkpoint if one exists -> train, validate and
checkpoint every epoch -> report the objective to Oríon.
"""

import argparse
import functools
import json
import logging
import math
import os
import pickle
import random
import resource
import shutil
import signal
import socket
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import rich.console
import rich.logging
import torch
import torch.nn.functional as F
from torchvision.models import resnet18
from tqdm import tqdm

# Oríon is deliberately not imported: importing `orion.client` costs ~3.5 s per trial and
# every trial is a fresh process. We use Oríon's documented results-file protocol instead
# (see `report_objective` at the bottom), so main.py also runs where Oríon is not installed.

logger = logging.getLogger("main")

# The train/validation split never depends on --seed: every trial must be scored on the
# same 5,000 validation images, or the objectives Oríon compares are not comparable.
# (Same split as upstream's `random_split(..., torch.Generator().manual_seed(42))`.)
VALIDATION_FRACTION = 0.1
SPLIT_SEED = 42
# Per-channel mean and std of the CIFAR-10 training images (on a 0-255 scale).
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)
# Oríon marks a trial that exits with this code `interrupted` (not `broken`) and hands it,
# with the same working directory, to the next free worker. Oríon tells us the code it uses.
INTERRUPTED_EXIT_CODE = int(os.environ.get("ORION_INTERRUPT_CODE", 130))


class DataError(Exception):
    """The data set is missing or unusable; the message says where and what to do."""


# ======================================================================================
# 1. Command line
# ======================================================================================


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the whole usage before the error; one line is easier to spot in
        # a Slurm log shared by several workers.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be zero or a positive number, got {text}")
    return value


def parse_args() -> argparse.Namespace:
    default_data_dir = Path(os.environ["SLURM_TMPDIR"], "data") if "SLURM_TMPDIR" in os.environ else Path("data")
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=positive_int, default=10)
    parser.add_argument("--learning-rate", type=positive_float, default=5e-4)
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir,
        help="folder with CIFAR-10 in its official python format: cifar-10-batches-py/ or "
        "cifar-10-python.tar.gz (default: $SLURM_TMPDIR/data, else ./data)",
    )
    parser.add_argument(
        "--augment", action="store_true",
        help="random crop (4-pixel padding) and horizontal flip of the training images, on the GPU",
    )
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=os.environ.get("ORION_WORKING_DIR"),
        help="where to save a checkpoint every epoch and resume from "
        "(default: the Oríon trial's working directory, $ORION_WORKING_DIR; none outside Oríon)",
    )
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the model (CUDA only; costs compile time at the start of every trial)",
    )
    return parser.parse_args()


# ======================================================================================
# 2. Data: CIFAR-10's official python format, loaded once as uint8 tensors on the device
# ======================================================================================
# We read the pickled batches ourselves instead of using torchvision's CIFAR10 class:
# it checks the official files' MD5s (so it refuses any look-alike data set, e.g. the
# small generated one the tests use) and it decodes every image through PIL on every
# epoch, which starves the GPU. The whole training set is only 150 MB as uint8.


def find_or_extract_cifar10(data_dir: Path) -> Path:
    """Returns the `cifar-10-batches-py` folder, extracting the official archive if needed."""
    batches_dir = data_dir / "cifar-10-batches-py"
    if batches_dir.is_dir():
        return batches_dir
    archive = data_dir / "cifar-10-python.tar.gz"
    if not archive.is_file():
        raise DataError(
            f"CIFAR-10 not found in {data_dir}: expected cifar-10-batches-py/ or cifar-10-python.tar.gz; "
            "stage the official archive there (job.sh does) or pass --data-dir"
        )
    # Several trials may start at once on a node: each extracts into its own temporary
    # folder and renames it into place. A rename is atomic, so nobody ever reads a
    # half-extracted folder; the losers of the race just delete their copy.
    try:
        extract_dir = Path(tempfile.mkdtemp(prefix=".extracting-", dir=data_dir))
    except OSError as error:
        raise DataError(f"cannot extract {archive}: {error}; extract it yourself or pass a writable --data-dir")
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(extract_dir, filter="data")
        extracted = extract_dir / "cifar-10-batches-py"
        if not extracted.is_dir():
            raise DataError(f"{archive} has no cifar-10-batches-py/ folder: it is not the CIFAR-10 python archive")
        try:
            extracted.rename(batches_dir)
        except OSError:
            if not batches_dir.is_dir():  # Not a lost race: a real error.
                raise
    except (tarfile.TarError, EOFError, OSError) as error:  # zlib.error is an OSError subclass here.
        raise DataError(f"{archive} is truncated or corrupt ({error}); delete it and stage it again")
    finally:
        shutil.rmtree(extract_dir, ignore_errors=True)
    return batches_dir


def load_batch_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads one pickled batch: images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    if not path.is_file():
        raise DataError(f"{path} is missing; delete {path.parent} and stage CIFAR-10 again")
    try:
        with open(path, "rb") as file:
            # The official batches were pickled by Python 2: their keys are byte strings
            # that "latin1" turns back into `str` (the way torchvision reads them).
            batch = pickle.load(file, encoding="latin1")
        batch = {key.decode() if isinstance(key, bytes) else key: value for key, value in batch.items()}
        images, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    except Exception as error:  # A truncated or corrupt pickle can raise almost anything.
        raise DataError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); "
            f"delete {path.parent} and stage CIFAR-10 again"
        )
    if len(images) == 0:
        raise DataError(f"{path} holds no images; delete {path.parent} and stage CIFAR-10 again")
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 images of shape (N, 3072), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: expected {len(images)} integer labels in 0..9")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def load_train_and_validation(data_dir: Path, device: torch.device):
    """Returns (train_images, train_labels, valid_images, valid_labels) on `device`."""
    batches_dir = find_or_extract_cifar10(data_dir)
    # The official training set is data_batch_1..5; test_batch is never touched here.
    parts = [load_batch_file(batches_dir / f"data_batch_{i}") for i in range(1, 6)]
    images = torch.from_numpy(np.concatenate([images for images, _ in parts]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in parts]))

    n_valid = int(VALIDATION_FRACTION * len(images))
    n_train = len(images) - n_valid
    if n_valid < 1 or n_train < 2:
        raise DataError(f"{batches_dir} holds only {len(images)} training images: too few to split")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, valid_idx = order[:n_train], order[n_train:]
    return (
        images[train_idx].to(device), labels[train_idx].to(device),
        images[valid_idx].to(device), labels[valid_idx].to(device),
    )


@functools.cache
def channel_mean_and_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a copy from Python to the GPU at every step would make the CPU
    # wait for the GPU to finish its queue, and stop it from queueing the next step ahead.
    mean = torch.tensor(CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(images: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """uint8 (N, 3, 32, 32) -> standardized float32 images in the model's memory format."""
    mean, std = channel_mean_and_std(images.device)
    return ((images.float() - mean) / std).contiguous(memory_format=memory_format)


def augment(images: torch.Tensor) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded image, and a random horizontal flip."""
    n = len(images)
    padded = F.pad(images, (4, 4, 4, 4))
    # One gather builds every image's crop at once (no per-image Python loop).
    top = torch.randint(0, 9, (n, 1, 1, 1), device=images.device)
    left = torch.randint(0, 9, (n, 1, 1, 1), device=images.device)
    arange = torch.arange(32, device=images.device)
    rows = (top + arange.view(1, 1, 32, 1)).expand(n, 3, 32, 40)
    cropped = padded.gather(2, rows)
    cols = (left + arange.view(1, 1, 1, 32)).expand(n, 3, 32, 32)
    cropped = cropped.gather(3, cols)
    flip = torch.rand(n, device=images.device) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), cropped.flip(3), cropped)


# ======================================================================================
# 3. Checkpoints: every epoch, and within one step of a preemption signal
# ======================================================================================
# A preempted job is killed (and requeued) with little or no notice; Oríon hands the
# interrupted trial, with the same working directory, to the next worker, which resumes
# here. Everything that influences the result is saved, RNG states included, so a resumed
# run reproduces the uninterrupted one exactly (on the CPU; cuDNN's autotuner may choose
# other, non-bitwise-identical kernels on a GPU).


def rng_states() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    # Write to a temporary file, flush it to disk, then rename: a kill at any moment leaves
    # either the previous checkpoint or the new one, never a truncated file.
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        # weights_only=False: the file holds RNG states (numpy arrays), and it is our own.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        logger.warning(f"Cannot read checkpoint {path} ({type(error).__name__}: {error}); starting from scratch")
        return None


# ======================================================================================
# 4. Training
# ======================================================================================

@torch.no_grad()
def evaluate(model, images, labels, use_bf16, memory_format) -> tuple[float, float]:
    """Mean cross-entropy per sample and accuracy over the whole validation set."""
    model.eval()
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), 500):
        x = normalize(images[start : start + 500], memory_format)
        y = labels[start : start + 500]
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    return total_loss.item() / len(images), correct.item() / len(images)


def main() -> None:
    start_time = time.perf_counter()
    args = parse_args()
    setup_logging(args.checkpoint_dir)
    logger.info(f"Args: {json.dumps(vars(args), default=str)}")
    if "SLURM_JOB_ID" in os.environ:
        # job.sh reads this line to find the trials of a job that was killed and requeued.
        logger.info(f"Running in Slurm job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()}")

    # Preemption: Slurm sends SIGTERM (or the signal job.sh forwards) a while before it
    # kills the job. We only note it here, and stop at the next safe point in the loop.
    stop_signal = []
    # SIGINT too: Ctrl-C under `bash job.sh` reaches every process of the terminal, and a
    # trial killed by KeyboardInterrupt would be marked broken instead of interrupted.
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stop_signal.append(signum))

    # Seed the random number generators as early as possible for reproducibility.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        # bf16 autocast and channels_last are what the GPU's tensor cores are fast at;
        # bf16 has float32's range, so unlike fp16 it needs no loss scaling.
        use_bf16, memory_format = True, torch.channels_last
        # No cudnn.benchmark: on an H200 it gained nothing measurable per step, and cost
        # seconds of autotuning per new shape (the last, smaller batch; validation) in every
        # trial's first epoch (benchmarks/RESULTS.md, "Step time").
    else:
        device = torch.device("cpu")
        use_bf16, memory_format = False, torch.contiguous_format  # Plain float32 on the CPU.
        logger.warning("No GPU found: training on the CPU, which is fine for a quick check but slow")

    try:
        train_images, train_labels, valid_images, valid_labels = load_train_and_validation(args.data_dir, device)
    except DataError as error:
        fail(str(error))

    model = resnet18(num_classes=10).to(device=device, memory_format=memory_format)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
        fused=device.type == "cuda",  # One kernel for the whole update: the step is launch-bound.
    )
    train_step_model = torch.compile(model) if args.compile and device.type == "cuda" else model

    # --- Resume from the trial's checkpoint, if a previous run of this trial left one. ---
    # What must match for a checkpoint to continue this run (--epochs may grow: a
    # multi-fidelity algorithm promotes a trial to more epochs with the same checkpoint).
    run_identity = {
        "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
        "batch_size": args.batch_size, "seed": args.seed, "augment": args.augment,
    }
    checkpoint_path = args.checkpoint_dir / "checkpoint.pt" if args.checkpoint_dir else None
    checkpoint = load_checkpoint(checkpoint_path) if checkpoint_path else None
    if checkpoint is not None and checkpoint["run_identity"] != run_identity:
        fail(
            f"{checkpoint_path} belongs to another run ({checkpoint['run_identity']}); "
            "pass another --checkpoint-dir or delete it"
        )
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_states(checkpoint["rng"])
        epoch, step, diverged = checkpoint["epoch"], checkpoint["step"], checkpoint["diverged"]
        epoch_order, train_loss_sum = checkpoint["epoch_order"], checkpoint["train_loss_sum"]
        if epoch_order is not None:
            epoch_order, train_loss_sum = epoch_order.to(device), train_loss_sum.to(device)
        val_history = checkpoint["val_history"]
        logger.info(f"Resuming training at epoch {epoch}" + (f", step {step}" if step else ""))
    else:
        epoch, step, diverged, epoch_order, train_loss_sum, val_history = 0, 0, False, None, None, []
        logger.debug("Starting training from scratch.")

    def checkpoint_state() -> dict:
        return {
            "run_identity": run_identity, "epoch": epoch, "step": step, "diverged": diverged,
            "epoch_order": epoch_order, "train_loss_sum": train_loss_sum, "val_history": val_history,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_states(),
        }

    steps_per_epoch = math.ceil(len(train_images) / args.batch_size)
    logger.info(
        f"Training on {device.type}: {len(train_images)} training and {len(valid_images)} validation images, "
        f"{steps_per_epoch} steps per epoch; ready after {time.perf_counter() - start_time:.1f} s"
    )

    # --- The training loop. ---
    while epoch < args.epochs and not diverged:
        if epoch_order is None:  # A fresh epoch (a resumed one keeps its saved order and loss sum).
            epoch_order = torch.randperm(len(train_images), device=device)
            train_loss_sum = torch.zeros((), device=device)
        model.train()
        epoch_start = time.perf_counter()
        steps_before = step
        progress_bar = tqdm(
            total=steps_per_epoch, initial=step, desc=f"Train epoch {epoch}",
            disable=not sys.stdout.isatty(),  # No progress bars in Slurm's log files.
        )
        while step < steps_per_epoch:
            if stop_signal:
                break
            batch = epoch_order[step * args.batch_size : (step + 1) * args.batch_size]
            step += 1
            if len(batch) < 2:
                continue  # BatchNorm cannot train on a single image.
            x = train_images[batch]
            x = normalize(augment(x) if args.augment else x, memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = train_step_model(x)
            loss = F.cross_entropy(logits.float(), train_labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            # Accumulated on the device: reading loss.item() every step would make the CPU
            # wait for the GPU. It is read once per epoch, below.
            train_loss_sum += loss.detach()
            if not progress_bar.disable:
                progress_bar.set_postfix(loss=loss.item(), refresh=False)
            progress_bar.update(1)
        progress_bar.close()

        if stop_signal:
            if checkpoint_path:
                save_checkpoint(checkpoint_path, checkpoint_state())
                logger.warning(f"Got signal {stop_signal[0]}: saved checkpoint at epoch {epoch}, step {step}; exiting")
            else:
                logger.warning(f"Got signal {stop_signal[0]}: exiting (no --checkpoint-dir, progress is lost)")
            sys.exit(INTERRUPTED_EXIT_CODE)

        # A diverged run (loss NaN or inf, e.g. a learning rate of 1.0) is still a valid
        # result for Oríon: its (poor) accuracy is what the algorithm must learn from.
        # Counting it as a broken trial would only hide that region of the search space.
        diverged = not torch.isfinite(train_loss_sum).item()
        if diverged:
            logger.warning(f"Training diverged in epoch {epoch} (loss is not finite); stopping early")
        train_seconds = time.perf_counter() - epoch_start  # .item() above waited for the GPU.
        val_loss, val_accuracy = evaluate(model, valid_images, valid_labels, use_bf16, memory_format)
        logger.info(f"Epoch {epoch}: Val loss: {val_loss:.3f} accuracy: {val_accuracy:.2%}")
        trained_images = min(step * args.batch_size, len(train_images)) - steps_before * args.batch_size
        logger.info(
            f"Epoch {epoch} trained in {train_seconds:.2f} s ({trained_images / train_seconds:.0f} images/s), "
            f"validated in {time.perf_counter() - epoch_start - train_seconds:.2f} s"
        )
        val_history.append((val_loss, val_accuracy))
        epoch, step, epoch_order = epoch + 1, 0, None
        if checkpoint_path:
            save_checkpoint(checkpoint_path, checkpoint_state())

    if checkpoint is not None and len(val_history) > args.epochs:
        logger.info(f"The checkpoint already holds {len(val_history)} epochs; reporting epoch {args.epochs - 1}")
    _, val_accuracy = val_history[min(args.epochs, len(val_history)) - 1]
    report_objective(1.0 - val_accuracy)
    # To size --mem and --mem-per-gpu, e.g. for several trials per GPU.
    peak_host_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak_gpu_gib = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0
    logger.info(f"Peak memory: host {peak_host_gib:.2f} GiB, GPU {peak_gpu_gib:.2f} GiB")


# ======================================================================================
# 5. Reporting to Oríon
# ======================================================================================


def report_objective(objective: float) -> None:
    """Oríon minimizes the objective it reads from the file named by $ORION_RESULTS_PATH.

    This is Oríon's documented language-agnostic protocol, and exactly what
    `orion.client.report_objective` writes, without its import time.
    """
    objective = float(objective)  # Oríon rejects numpy and torch numbers.
    results_path = os.environ.get("ORION_RESULTS_PATH")
    if results_path:
        with open(results_path, "w") as file:
            json.dump([{"name": "objective", "type": "objective", "value": objective}], file)
    logger.info(f"Objective (1 - validation accuracy): {objective:.4f}")


def setup_logging(checkpoint_dir: Path | None) -> None:
    handlers: list[logging.Handler] = [
        rich.logging.RichHandler(
            markup=True,
            # Wider log lines in sbatch output files than on the terminal.
            console=rich.console.Console(width=120 if not sys.stdout.isatty() else None),
        )
    ]
    if checkpoint_dir:
        # Several workers share one Slurm output file; each trial also keeps its own log.
        try:
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            file_handler = logging.FileHandler(checkpoint_dir / "train.log")
        except OSError as error:
            fail(f"cannot write to --checkpoint-dir {checkpoint_dir}: {error}")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(file_handler)
        # A crash's traceback belongs in the trial's log too (Oríon then marks it broken).
        sys.excepthook = lambda *exc_info: logger.critical("Uncaught exception", exc_info=exc_info)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=handlers)


def fail(message: str) -> NoReturn:
    """Bad input: one error line on stderr (and in the trial's log), exit code 1, no traceback."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.makeLogRecord({"msg": f"error: {message}", "levelname": "ERROR"}))
    sys.exit(f"error: {message}")


if __name__ == "__main__":
    main()
