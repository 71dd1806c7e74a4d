"""Train torchvision's ResNet18 on CIFAR-10 and report `1 - validation accuracy` to Oríon.

One trial of the search: `orion hunt` (see job.sh) runs this script once per trial, with the
trial's hyperparameters on the command line. It runs just as well by hand, on a GPU or
(slowly) on a CPU:

    uv run python main.py --data-dir ./data --epochs 1

Speed (benchmarks/RESULTS.md): on one H200, an epoch of 45,000 images trains in about 4 s
and five trials can share the GPU; upstream's log shows 72 % validation accuracy after 10
epochs at learning rate 1.4e-3 for this model and optimizer.

Read `main()` first: it is the table of contents. The sections below it: 1. command line,
seeds and hardware, 2. data, 3. model and training step, 4. run state and checkpoints,
5. preemption, 6. logging, metrics and the report to Oríon. To train another model or data
set, change `build_model` and `load_train_and_validation` (README, "Make it yours").
"""

import argparse
import dataclasses
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
from typing import NamedTuple, NoReturn

import numpy as np
import rich.console
import rich.logging
import torch
import torch.nn.functional as F
from torchvision.models import resnet18
from tqdm import tqdm

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
# Arguments that may differ when a trial resumes from its checkpoint: a multi-fidelity
# algorithm promotes a trial to more --epochs, and paths differ between nodes. Every other
# argument (every hyperparameter, including one you add) must match the checkpoint's.
MAY_CHANGE_ON_RESUME = {"epochs", "data_dir", "checkpoint_dir", "compile", "cuda_graph"}
CHECKPOINT_FORMAT = 2  # Bump when the checkpoint's contents change.


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    setup_logging(args.checkpoint_dir)
    logger.info(f"Args: {json.dumps(vars(args), default=str)}")
    if "SLURM_JOB_ID" in os.environ:
        # `orion_tools.py reclaim` reads this line (SLURM_JOB_LINE) to find the trials of a job
        # that was killed and requeued: change both together.
        logger.info(f"Running in Slurm job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()}")
    stop = StopSignal.install()
    seed_everything(args.seed)
    hardware = pick_hardware()

    try:  # From here on the GPU can run out of memory (see out_of_memory_message).
        data = load_data_or_fail(args.data_dir, hardware.device, args.batch_size)
        model, optimizer = build_model_and_optimizer(args, hardware)
        state = resume_or_start(args, model, optimizer, hardware.device)
        step = make_train_step(model, optimizer, args, hardware)
        ready_seconds = time.perf_counter() - started
        logger.info(
            f"Training on {hardware.device.type}: {len(data.train_images)} training and {len(data.valid_images)} "
            f"validation images, {steps_per_epoch(data, args)} steps per epoch; "
            f"ready after {ready_seconds:.1f} s"
        )

        while state.epoch < args.epochs and not state.diverged:
            epoch_start = time.perf_counter()
            trained_images = train_one_epoch(model, step, data, state, args, hardware, stop)
            if stop.received:
                save_and_exit_interrupted(args.checkpoint_dir, state, model, optimizer, args, stop.received)
            train_seconds = time.perf_counter() - epoch_start  # train_one_epoch waited for the GPU.
            val_loss, val_accuracy = evaluate(model, data.valid_images, data.valid_labels, hardware)
            end_epoch(state, data, args, hardware, val_loss, val_accuracy, trained_images, train_seconds,
                      val_seconds=time.perf_counter() - epoch_start - train_seconds, started=started,
                      ready_seconds=ready_seconds)
            save_checkpoint_and_metrics(args.checkpoint_dir, state, model, optimizer, args)
    except torch.cuda.OutOfMemoryError as error:
        # No checkpoint now: the last one is kept as it is.
        fail(out_of_memory_message(error, hardware.device))

    report_objective(1.0 - reported_epoch(state, args)["val_accuracy"])
    peak_host_gib, peak_gpu_gib = peak_memory_gib(hardware.device)  # To size --mem and --mem-per-gpu.
    logger.info(f"Peak memory: host {peak_host_gib:.2f} GiB, GPU {peak_gpu_gib:.2f} GiB")


# ======================================================================================
# 1. Command line, seeds and hardware
# ======================================================================================


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the whole usage before the error; one line is easier to spot in
        # a Slurm log shared by several workers.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_at_least(minimum: int, why: str = "", maximum: int | None = None):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum or (maximum is not None and value > maximum):
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            wanted += f" and <= {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"must be {wanted}{why}, got {text}")
        return value
    parse.__name__ = "integer"  # argparse's message for "ten": "invalid integer value: 'ten'".
    return parse


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


positive_float.__name__ = non_negative_float.__name__ = "number"  # "invalid number value: 'abc'"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_data_dir = Path(os.environ["SLURM_TMPDIR"], "data") if "SLURM_TMPDIR" in os.environ else Path("data")
    parser = OneLineErrorParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        # No abbreviations: `--learning 0.1` after job.sh would pass its check for searched
        # arguments, then lose silently to Oríon's `--learning-rate VALUE` on the same line.
        allow_abbrev=False,
    )
    # The hyperparameters. A new one is one line here (and a prior in job.sh to search it).
    parser.add_argument("--epochs", type=int_at_least(1), default=10)
    parser.add_argument("--learning-rate", type=positive_float, default=5e-4)
    parser.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    parser.add_argument("--batch-size", type=int_at_least(2, " (BatchNorm needs two images)"), default=128)
    parser.add_argument("--seed", type=int_at_least(0, maximum=2**32 - 1), default=42)  # numpy's range.
    parser.add_argument(
        "--augment", action="store_true",
        help="random crop (4-pixel padding) and horizontal flip of the training images, on the GPU",
    )
    # Where things are, and how to run.
    parser.add_argument(
        "--data-dir", type=Path, default=default_data_dir,
        help="folder with CIFAR-10 in its official python format: cifar-10-batches-py/ or "
        "cifar-10-python.tar.gz (default: $SLURM_TMPDIR/data, else ./data)",
    )
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=os.environ.get("ORION_WORKING_DIR"),
        help="where to keep checkpoint.pt, metrics.jsonl and train.log, and resume from "
        "(default: the Oríon trial's working directory, $ORION_WORKING_DIR; none outside Oríon)",
    )
    parser.add_argument(
        "--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile the model for training, in this mode (CUDA only; costs compile time in every trial)",
    )
    parser.add_argument(
        "--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
        help="replay the whole training step as one CUDA graph (CUDA only; see CudaGraphTrainStep)",
    )
    return parser.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Hardware(NamedTuple):
    device: torch.device
    use_bf16: bool
    memory_format: torch.memory_format


def pick_hardware() -> Hardware:
    if torch.cuda.is_available():
        # bf16 autocast and channels_last are what the GPU's tensor cores are fast at; bf16
        # has float32's range, so unlike fp16 it needs no loss scaling. No cudnn.benchmark:
        # it gained nothing per step on an H200 and autotuned each new shape for seconds in
        # every trial (benchmarks/RESULTS.md, "Step time").
        return Hardware(torch.device("cuda"), True, torch.channels_last)
    logger.warning("No GPU found: training on the CPU, which is fine for a quick check but slow")
    return Hardware(torch.device("cpu"), False, torch.contiguous_format)  # Plain float32.


# ======================================================================================
# 2. Data: CIFAR-10's official python format, loaded once as uint8 tensors on the device
# ======================================================================================
# We read the pickled batches ourselves instead of using torchvision's CIFAR10 class:
# it checks the official files' MD5s (so it refuses any look-alike data set, e.g. the
# small generated one the tests use) and it decodes every image through PIL on every
# epoch, which starves the GPU. The whole training set is only 150 MB as uint8.


class DataError(Exception):
    """The data set is missing or unusable; the message says where and what to do."""


class Data(NamedTuple):
    train_images: torch.Tensor  # (N, 3, 32, 32) uint8, on the device
    train_labels: torch.Tensor  # (N,) int64
    valid_images: torch.Tensor
    valid_labels: torch.Tensor


def load_data_or_fail(data_dir: Path, device: torch.device, batch_size: int) -> Data:
    try:
        data = load_train_and_validation(data_dir, device)
    except DataError as error:
        fail(str(error))
    if batch_size > len(data.train_images):
        fail(f"--batch-size {batch_size} is larger than the {len(data.train_images)} training images: pass a smaller one")
    return data


def load_train_and_validation(data_dir: Path, device: torch.device) -> Data:
    """The five official training batches, split 90/10 with a fixed seed, on `device`."""
    batches_dir = find_or_extract_cifar10(data_dir)
    # test_batch is never touched here: it is for the final evaluation of the chosen model.
    parts = [load_batch_file(batches_dir / f"data_batch_{i}") for i in range(1, 6)]
    images = torch.from_numpy(np.concatenate([images for images, _ in parts]))
    labels = torch.from_numpy(np.concatenate([labels for _, labels in parts]))

    n_valid = int(VALIDATION_FRACTION * len(images))
    n_train = len(images) - n_valid
    if n_valid < 1 or n_train < 2:
        raise DataError(f"{batches_dir} holds only {len(images)} training images: too few to split")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, valid_idx = order[:n_train], order[n_train:]
    return Data(
        images[train_idx].to(device), labels[train_idx].to(device),
        images[valid_idx].to(device), labels[valid_idx].to(device),
    )


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
    if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected uint8 images of shape (N, 3072), got {images.dtype} {images.shape}")
    if len(images) == 0:
        raise DataError(f"{path} holds no images; delete {path.parent} and stage CIFAR-10 again")
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{path}: expected {len(images)} integer labels in 0..9")
    return images.reshape(-1, 3, 32, 32), labels.astype(np.int64)


@functools.cache
def channel_mean_and_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a copy from Python to the GPU at every step would make the CPU
    # wait for the GPU to finish its queue, and cannot be captured in a CUDA graph.
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
# 3. Model, optimizer, and the training step
# ======================================================================================


def build_model(hardware: Hardware) -> torch.nn.Module:
    return resnet18(num_classes=10).to(device=hardware.device, memory_format=hardware.memory_format)


def build_model_and_optimizer(args, hardware: Hardware) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = build_model(hardware)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
        fused=hardware.device.type == "cuda",  # One kernel for the whole update: the step is launch-bound.
        # A CUDA graph replays the update with its step count kept on the GPU.
        capturable=use_cuda_graph(args, hardware),
    )
    return model, optimizer


def train_step(model, optimizer, images: torch.Tensor, labels: torch.Tensor, hardware: Hardware,
               augment_images: bool = False) -> torch.Tensor:
    """One optimization step on a batch of uint8 images; returns the batch's summed loss, on the device.

    The benchmarks time this very function (benchmarks/step_time.py).
    """
    x = normalize(augment(images) if augment_images else images, hardware.memory_format)
    with torch.autocast(hardware.device.type, dtype=torch.bfloat16, enabled=hardware.use_bf16):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(labels)


def use_cuda_graph(args, hardware: Hardware) -> bool:
    return args.cuda_graph and hardware.device.type == "cuda" and not args.compile


def make_train_step(model, optimizer, args, hardware: Hardware):
    """`step(images, labels) -> summed loss`: `train_step`, or its CUDA-graph replay (--cuda-graph)."""
    if args.cuda_graph and not use_cuda_graph(args, hardware):
        logger.warning("--cuda-graph needs a GPU and no --compile: training without the graph")
    if args.compile and hardware.device.type != "cuda":
        logger.warning("--compile needs a GPU: training without it")
    if use_cuda_graph(args, hardware):
        return CudaGraphTrainStep(model, optimizer, hardware, args.batch_size, args.augment)
    step_model = torch.compile(model, mode=args.compile) if args.compile and hardware.device.type == "cuda" else model
    return functools.partial(train_step, step_model, optimizer, hardware=hardware, augment_images=args.augment)


class CudaGraphTrainStep:
    """The whole training step (forward, loss, backward, AdamW) captured once as a CUDA graph.

    A ResNet18 step at batch 128 launches hundreds of small kernels; from Python that takes
    longer than the GPU needs to run them. Replaying a graph launches them all at once.
    This follows PyTorch's "whole-network capture" recipe (CUDA semantics notes): a few
    eager steps on a side stream first, static input buffers that every batch is copied
    into, a capturable optimizer, and no host sync inside. The graph has a fixed batch
    size: the last, smaller batch of an epoch runs eagerly. If capture fails, it warns once
    and trains eagerly.
    """

    EAGER_STEPS_BEFORE_CAPTURE = 3  # Allocate cuDNN/cuBLAS workspaces and the optimizer state.

    def __init__(self, model, optimizer, hardware: Hardware, batch_size: int, augment_images: bool):
        self.eager_step = functools.partial(train_step, model, optimizer, hardware=hardware,
                                            augment_images=augment_images)
        self.optimizer, self.batch_size = optimizer, batch_size
        self.images = torch.zeros((batch_size, 3, 32, 32), dtype=torch.uint8, device=hardware.device)
        self.labels = torch.zeros((batch_size,), dtype=torch.long, device=hardware.device)
        self.graph, self.loss, self.eager_steps, self.failed = None, None, 0, False

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if len(images) != self.batch_size or self.failed:
            return self.eager_step(images, labels)
        if self.graph is None and self.eager_steps < self.EAGER_STEPS_BEFORE_CAPTURE:
            self.eager_steps += 1
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                loss = self.eager_step(images, labels)
            torch.cuda.current_stream().wait_stream(side_stream)
            return loss
        if self.graph is None and not self.capture():
            return self.eager_step(images, labels)
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.loss  # Overwritten by the next replay: the caller adds it up at once.

    def capture(self) -> bool:
        try:
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # Gradients then live in the graph's memory pool.
            with torch.cuda.graph(graph):
                self.loss = self.eager_step(self.images, self.labels)
        except Exception as error:  # Capture refuses any host sync or CPU-GPU copy inside the step.
            logger.warning(f"Could not capture the training step in a CUDA graph ({type(error).__name__}: "
                           f"{error}); training without it")
            self.failed = True
            return False
        self.graph = graph
        return True


def steps_per_epoch(data: Data, args) -> int:
    return math.ceil(len(data.train_images) / args.batch_size)


def train_one_epoch(model, step, data: Data, state: "TrainingState", args, hardware: Hardware,
                    stop: "StopSignal") -> int:
    """Trains from `state.step` to the end of the epoch, or until a stop signal; returns the images trained."""
    model.train()
    if state.epoch_order is None:  # A fresh epoch (a resumed one keeps its saved order and loss sum).
        state.epoch_order = torch.randperm(len(data.train_images), device=hardware.device)
        state.train_loss_sum = torch.zeros((), device=hardware.device)
    n_steps, trained_images = steps_per_epoch(data, args), 0
    progress_bar = tqdm(total=n_steps, initial=state.step, desc=f"Train epoch {state.epoch}",
                        disable=not sys.stdout.isatty())  # No progress bars in Slurm's log files.
    while state.step < n_steps and not stop.received:
        batch = state.epoch_order[state.step * args.batch_size : (state.step + 1) * args.batch_size]
        state.step += 1
        if len(batch) < 2:
            continue  # The last batch holds one image: BatchNorm cannot train on it.
        # Accumulated on the device: reading the loss every step would make the CPU wait
        # for the GPU. It is read once per epoch.
        state.train_loss_sum += step(data.train_images[batch], data.train_labels[batch])
        trained_images += len(batch)
        progress_bar.update(1)
    progress_bar.close()
    # A diverged run (loss NaN or inf, e.g. a learning rate of 1.0) is still a valid result
    # for Oríon: its (poor) accuracy is what the algorithm must learn from. Counting it as
    # a broken trial would only hide that region of the search space. (.item() waits for the GPU.)
    state.diverged = not stop.received and not torch.isfinite(state.train_loss_sum).item()
    return trained_images


@torch.no_grad()
def evaluate(model, images: torch.Tensor, labels: torch.Tensor, hardware: Hardware) -> tuple[float, float]:
    """Mean cross-entropy per sample and accuracy over the whole validation set."""
    model.eval()
    total_loss = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for start in range(0, len(images), 500):
        x = normalize(images[start : start + 500], hardware.memory_format)
        y = labels[start : start + 500]
        with torch.autocast(hardware.device.type, dtype=torch.bfloat16, enabled=hardware.use_bf16):
            logits = model(x)
        total_loss += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(dim=1) == y).sum()
    return total_loss.item() / len(images), correct.item() / len(images)


# ======================================================================================
# 4. Run state and checkpoints: every epoch, and within one step of a preemption signal
# ======================================================================================
# A preempted job is killed (and requeued) with little or no notice; Oríon hands the
# interrupted trial, with the same working directory, to the next worker, which resumes
# here. Everything that influences the result is saved, RNG states included, so a resumed
# run reproduces the uninterrupted one exactly (tested on the CPU).


@dataclasses.dataclass
class TrainingState:
    """Where the run is, besides the model's and optimizer's own state."""

    epoch: int = 0  # Epochs completed.
    step: int = 0  # Steps done in the current epoch.
    diverged: bool = False
    epoch_order: torch.Tensor | None = None  # The current epoch's shuffled image order.
    train_loss_sum: torch.Tensor | None = None  # Summed over the current epoch's images so far.
    history: list[dict] = dataclasses.field(default_factory=list)  # One metrics record per epoch.


def run_identity(args) -> dict:
    """What a checkpoint must match to continue this run: every argument that can change the result."""
    return {name: value for name, value in vars(args).items() if name not in MAY_CHANGE_ON_RESUME}


def resume_or_start(args, model, optimizer, device: torch.device) -> TrainingState:
    checkpoint = load_checkpoint(args.checkpoint_dir / "checkpoint.pt", args) if args.checkpoint_dir else None
    if checkpoint is None:
        return TrainingState()
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_states(checkpoint["rng"])
    state = TrainingState(**checkpoint["training_state"])
    if state.epoch_order is not None:
        state.epoch_order, state.train_loss_sum = state.epoch_order.to(device), state.train_loss_sum.to(device)
    logger.info(f"Resuming training at epoch {state.epoch}" + (f", step {state.step}" if state.step else ""))
    write_metrics(args.checkpoint_dir, state)  # In case the last run was killed before writing them.
    return state


def load_checkpoint(path: Path, args) -> dict | None:
    if path.is_dir():
        fail(f"{path} is a folder, not a checkpoint: remove it, or pass another --checkpoint-dir")
    if not path.exists():
        return None
    try:
        # weights_only=False: the file holds RNG states (numpy arrays), and it is our own.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        logger.warning(f"Cannot read checkpoint {path} ({type(error).__name__}: {error}); starting from scratch")
        return None
    expected_keys = {"format", "run_identity", "training_state", "model", "optimizer", "rng"}
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT
            and expected_keys <= checkpoint.keys()):
        fail(f"{path} was not written by this version of main.py: delete it to start this trial over, "
             "or pass another --checkpoint-dir")
    if checkpoint["run_identity"] != run_identity(args):
        fail(f"{path} belongs to another run ({checkpoint['run_identity']}); pass another --checkpoint-dir or delete it")
    return checkpoint


def save_checkpoint_and_metrics(checkpoint_dir: Path | None, state: TrainingState, model, optimizer, args) -> bool:
    """Saves the whole run (write, fsync, rename); returns False, with a warning, if it could not."""
    if checkpoint_dir is None:
        return False
    path = checkpoint_dir / "checkpoint.pt"
    temporary = temporary_path(path)
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "run_identity": run_identity(args), "training_state": vars(state),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "rng": rng_states(),
    }
    try:
        # A kill at any moment leaves either the previous checkpoint or the new one, never
        # a truncated file.
        with open(temporary, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:  # A full disk, a quota: the run itself is still fine.
        temporary.unlink(missing_ok=True)
        logger.warning(f"Cannot save checkpoint {path} ({error}); the previous one, if any, is kept")
        return False
    write_metrics(checkpoint_dir, state)
    return True


def temporary_path(path: Path) -> Path:
    """Where this process writes `path` before renaming it into place: a name of its own.

    Should Oríon hand a trial to a second worker while the first still runs (a lost
    heartbeat), a shared name would mix their two writes into one corrupt file.
    """
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")  # pids repeat across nodes.


def save_and_exit_interrupted(checkpoint_dir, state, model, optimizer, args, signum: int) -> NoReturn:
    if save_checkpoint_and_metrics(checkpoint_dir, state, model, optimizer, args):
        logger.warning(f"Got signal {signum}: saved checkpoint at epoch {state.epoch}, step {state.step}; exiting")
    else:
        logger.warning(f"Got signal {signum}: exiting without a new checkpoint (progress since the last one is lost)")
    # Interrupted, not broken, whether or not the save worked: the trial resumes from its
    # last checkpoint (or from scratch), and Oríon does not count it toward max_broken.
    sys.exit(INTERRUPTED_EXIT_CODE)


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


# ======================================================================================
# 5. Preemption: a stop signal is noted, and acted on at the next step
# ======================================================================================


class StopSignal:
    """Slurm sends SIGTERM (or job.sh forwards one) a while before it kills the job.

    The handler only notes it; the training loop checks `received` between steps, then
    saves a checkpoint and exits with Oríon's "interrupted" code.
    """

    def __init__(self):
        self.received: int | None = None

    def handle(self, signum, frame) -> None:
        self.received = self.received or signum

    @classmethod
    def install(cls) -> "StopSignal":
        stop = cls()
        # SIGINT too: Ctrl-C under `bash job.sh` reaches every process of the terminal, and
        # a trial killed by KeyboardInterrupt would be marked broken instead of interrupted.
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, stop.handle)
        return stop


# ======================================================================================
# 6. Logging, per-epoch metrics, and the report to Oríon
# ======================================================================================


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


def out_of_memory_message(error: torch.cuda.OutOfMemoryError, device: torch.device) -> str:
    """The GPU was full: what this trial held of it, and what to change.

    A configuration that does not fit exits 1, as the other errors of `fail`: Oríon marks
    the trial broken rather than hand it, unchanged, to a worker that would run out again.
    """
    # torch's message is a paragraph; its first two sentences say how much was asked for.
    asked = ". ".join(str(error).split(". ")[:2])  # "CUDA out of memory. Tried to allocate 2.00 GiB"
    held = ""
    if device.type == "cuda":  # Several trials per GPU (job.sh --ntasks-per-gpu) share its memory.
        gib = lambda n_bytes: f"{n_bytes / 2**30:.1f} GiB"  # noqa: E731
        held = (f"; this trial held {gib(torch.cuda.memory_allocated(device))} "
                f"(at most {gib(torch.cuda.max_memory_allocated(device))}) "
                f"of the GPU's {gib(torch.cuda.get_device_properties(device).total_memory)}")
    return (f"the GPU ran out of memory ({asked}){held}: "
            "lower --batch-size, or run fewer trials per GPU (--ntasks-per-gpu)")


def peak_memory_gib(device: torch.device) -> tuple[float, float]:
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return host, torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else 0.0


def end_epoch(state: TrainingState, data: Data, args, hardware: Hardware, val_loss: float, val_accuracy: float,
              trained_images: int, train_seconds: float, val_seconds: float, started: float,
              ready_seconds: float) -> None:
    """Logs the epoch and adds its metrics record to the run's history; moves on to the next epoch."""
    if state.diverged:
        logger.warning(f"Training diverged in epoch {state.epoch} (loss is not finite); stopping early")
    # Other tools parse this exact line: keep its format.
    logger.info(f"Epoch {state.epoch}: Val loss: {val_loss:.3f} accuracy: {val_accuracy:.2%}")
    images_per_second = trained_images / train_seconds
    logger.info(f"Epoch {state.epoch} trained in {train_seconds:.2f} s ({images_per_second:.0f} images/s), "
                f"validated in {val_seconds:.2f} s")
    # Every image but a last batch of one, which train_one_epoch skips.
    epoch_images = len(data.train_images) - (1 if len(data.train_images) % args.batch_size == 1 else 0)
    peak_host_gib, peak_gpu_gib = peak_memory_gib(hardware.device)
    state.history.append({
        "epoch": state.epoch,
        "train_loss": finite_or_none(state.train_loss_sum.item() / epoch_images),
        "val_loss": finite_or_none(val_loss),
        "val_accuracy": val_accuracy,
        "train_seconds": train_seconds,  # This process's part of the epoch, if it resumed mid-epoch.
        "val_seconds": val_seconds,
        "images_per_second": images_per_second,
        "trained_images": trained_images,
        "train_images": len(data.train_images),
        "valid_images": len(data.valid_images),
        "ready_seconds": ready_seconds,  # main() started (after the imports) -> first training step.
        "seconds_since_start": time.perf_counter() - started,  # Of this process.
        "device": hardware.device.type,
        "peak_host_gib": peak_host_gib,
        "peak_gpu_gib": peak_gpu_gib,
        "diverged": state.diverged,
        "end_time": time.time(),
    })
    state.epoch, state.step, state.epoch_order, state.train_loss_sum = state.epoch + 1, 0, None, None


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN.


def write_metrics(checkpoint_dir: Path, state: TrainingState) -> None:
    """metrics.jsonl: one JSON line per epoch, always the same epochs as the checkpoint beside it.

    Learning-curve plots, tests and benchmarks read this file instead of the log.
    """
    path = checkpoint_dir / "metrics.jsonl"
    temporary = temporary_path(path)
    try:
        temporary.write_text("".join(json.dumps(record) + "\n" for record in state.history))
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        logger.warning(f"Cannot write {path} ({error})")


def reported_epoch(state: TrainingState, args) -> dict:
    """The last epoch's metrics; from a checkpoint that trained further, epoch --epochs."""
    if len(state.history) > args.epochs:
        logger.info(f"The checkpoint already holds {len(state.history)} epochs; reporting epoch {args.epochs - 1}")
    return state.history[min(args.epochs, len(state.history)) - 1]


def report_objective(objective: float) -> None:
    """Writes the objective where Oríon reads it: the file named by $ORION_RESULTS_PATH.

    This is the file `orion.client.report_objective` writes (Oríon's documented results
    protocol; tests/test_orion.py checks they match), without importing Oríon, which costs
    seconds per trial (README, "main.py by hand") and every trial is a fresh process.
    """
    objective = float(objective)  # Oríon rejects numpy and torch numbers.
    results_path = os.environ.get("ORION_RESULTS_PATH")
    if results_path:
        with open(results_path, "w") as file:
            json.dump([{"name": "objective", "type": "objective", "value": objective}], file)
    logger.info(f"Objective (1 - validation accuracy): {objective:.4f}")


if __name__ == "__main__":
    main()
