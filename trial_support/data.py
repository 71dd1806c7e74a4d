"""A trial's data: what main.py's data set module returns, checked against what it declares, split,
and served to the training loop in batches on the device. Kept as it is when you make main.py yours.

A data set module's `load(data_dir)` returns a dict in one of two forms (README, "Make it yours"):

- **held on the device**: `inputs` and `targets`, arrays with one row per example. The whole set
  is copied to the GPU once; every batch is then an index into it (no copy, no worker process,
  capturable in a CUDA graph). For data that fits in the GPU's memory, once per trial sharing it.
- **streamed from disk**: `dataset`, a torch `Dataset` of (input, target) pairs, read by a
  `DataLoader` (worker processes: the job's --cpus-per-task) into pinned memory, a batch at a
  time. For data larger than the GPU's or the node's memory. Its items must be the same at
  every read (decode, resize, crop to a fixed size): random augmentation belongs in the module's
  `augment`, on the device, where the trial's random state is checkpointed and a resumed run
  sees the very same batches.

Both forms may bring their own validation split (`valid_inputs` and `valid_targets`, or
`valid_dataset`); otherwise 10 % is kept aside, always the same examples (a fixed seed).

What the module declares, the trial checks: `classes` (a classification: integer targets in
0..classes-1, and the model gives `classes` scores per example) or no `classes` (a regression:
float targets, kept float, and the model's output has the shape of a target); `mean` and `std`
(one per channel, i.e. per entry of an input's first axis: inputs are standardized on the device
as float32), or neither (inputs reach the model as they are: token ids stay integers).
"""

import logging
import os
import random
from typing import Iterator

import numpy as np
import torch

logger = logging.getLogger("main")

# Every trial is scored on the same validation examples, whatever its --seed: else the objectives
# that Oríon compares are not comparable. (Upstream's split: random_split with seed 42.)
VALIDATION_FRACTION = 0.1
SPLIT_SEED = 42
FORMS = "either `inputs` and `targets` (arrays, held on the device) or `dataset` (a torch Dataset, streamed)"


class DataProblem(ValueError):
    """What is wrong with what the data set module returned, as the end of a sentence."""


def default_loader_workers() -> int:
    """DataLoader worker processes: the CPUs Slurm gave the task (--cpus-per-task), else this machine's."""
    if "SLURM_CPUS_PER_TASK" in os.environ:
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(1, len(os.sched_getaffinity(0)))


class Data:
    """The training and validation examples, served in batches on the device.

    `streamed` says which form runs; `classes` (None: a regression), `input_shape`, `train_size`
    and `valid_size` are what the model and the loop need to know; `prepare(inputs)` turns a batch
    as stored into the model's input.
    """

    def __init__(self, loaded: dict, device: torch.device, memory_format, batch_size: int, loader_workers: int,
                 on_read_error=None):
        self.device, self.batch_size = device, batch_size
        # A streamed example that cannot be read (in a worker process): one line, not the
        # DataLoader's message, which carries the worker's whole traceback. Trial: its `fail`.
        self.on_read_error = on_read_error
        self.classes = declared_classes(loaded)
        self.streamed = "dataset" in loaded
        if self.streamed:
            train, valid = streamed_split(loaded)
            self.train, self.valid = train, valid
            first_input, first_target = as_tensors(train[0])
            check_item_is_stable(train, first_input, first_target)
            self.train_size, self.valid_size = len(train), len(valid)
            # Every target where the Dataset lists them (torchvision's do), else the first one's.
            all_targets = getattr(loaded["dataset"], "targets", None)
            check_targets(torch.as_tensor(np.asarray(all_targets)) if all_targets is not None
                          else first_target.unsqueeze(0), self.classes)
            self.input_shape, self.input_dtype = tuple(first_input.shape), first_input.dtype
            self.target_shape, self.target_dtype = tuple(first_target.shape), target_dtype(first_target.dtype)
            self.loader_workers = loader_workers
            # The epoch's batches are set before each epoch; the workers stay (persistent_workers)
            # and only indices travel to them. A generator of their own: making a loader's
            # iterator draws a seed, which must not move the trial's checkpointed random state.
            self.train_batches_to_read: list[list[int]] = []
            reading = dict(num_workers=loader_workers, pin_memory=device.type == "cuda",
                           persistent_workers=loader_workers > 0)
            self.train_loader = torch.utils.data.DataLoader(
                train, batch_sampler=_BatchesToRead(self), generator=torch.Generator(), **reading)
            self.valid_loader = torch.utils.data.DataLoader(
                valid, batch_size=batch_size, generator=torch.Generator(), **reading)
            self.resident_bytes = 0
        else:
            inputs, targets, valid_inputs, valid_targets = resident_split(loaded)
            check_targets(torch.cat([targets, valid_targets]), self.classes)
            self.input_shape, self.input_dtype = tuple(inputs.shape[1:]), inputs.dtype
            self.target_shape, self.target_dtype = tuple(targets.shape[1:]), target_dtype(targets.dtype)
            self.train_size, self.valid_size = len(inputs), len(valid_inputs)
            self.resident_bytes = sum(t.nbytes for t in (inputs, targets, valid_inputs, valid_targets))
            try:
                # On the device once: a copy from Python to the GPU at every step would make the
                # CPU wait for the GPU's queue, and cannot be captured in a CUDA graph.
                self.train_inputs, self.valid_inputs = inputs.to(device), valid_inputs.to(device)
                self.train_targets = targets.to(device, self.target_dtype)
                self.valid_targets = valid_targets.to(device, self.target_dtype)
            except torch.cuda.OutOfMemoryError:
                raise DataProblem(f"take {self.resident_bytes / 2**30:.1f} GiB, more than the GPU has free: return a "
                                  "torch Dataset as `dataset` to stream them from disk (docs/make-it-yours.md), or run fewer trials per GPU (--ntasks-per-gpu)") from None
        self.mean, self.std = statistics(loaded, self.input_shape, device)
        # channels_last is what the GPU's tensor cores are fast at, for batches of images.
        self.memory_format = memory_format if len(self.input_shape) == 3 else torch.contiguous_format
        if self.train_size < 2:
            raise DataProblem(f"hold only {self.train_size} training example(s): too few to train on")
        if self.valid_size < 1:
            raise DataProblem("hold no validation example: too few to split")
        if batch_size > self.train_size:
            raise DataProblem(f"hold {self.train_size} training examples, fewer than --batch-size {batch_size}: "
                              "pass a smaller one")

    def prepare(self, inputs: torch.Tensor) -> torch.Tensor:
        """A batch as stored -> the model's input: standardized float32 if the module gave `mean` and `std`."""
        if self.mean is None:
            return inputs
        return ((inputs.float() - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def close(self) -> None:
        """Stops a streamed data set's worker processes now (else at the process's exit)."""
        for loader in (getattr(self, "train_loader", None), getattr(self, "valid_loader", None)):
            iterator = getattr(loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
                loader._iterator = None

    def describe(self) -> str:
        target = f"{self.classes} classes" if self.classes else f"float targets of shape {self.target_shape}"
        shape = f"inputs of shape {self.input_shape} {str(self.input_dtype).removeprefix('torch.')}, {target}"
        where = (f"streamed from disk by {self.loader_workers} DataLoader worker(s)" if self.streamed
                 else f"held on the {self.device.type} ({self.resident_bytes / 2**20:,.1f} MiB)")
        return f"{self.train_size} training and {self.valid_size} validation examples, {shape}; {where}"

    def new_epoch_order(self) -> torch.Tensor:
        """The epoch's shuffled order of the training examples, from the trial's random state."""
        return torch.randperm(self.train_size, device="cpu" if self.streamed else self.device)

    def order_to_device(self, order: torch.Tensor) -> torch.Tensor:
        return order.cpu() if self.streamed else order.to(self.device)

    def train_batches(self, order: torch.Tensor, first_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches of `order` from step `first_step` on, on the device (a batch of one is left out:
        BatchNorm cannot train on it; the caller still counts its step)."""
        starts = range(first_step * self.batch_size, self.train_size, self.batch_size)
        if not self.streamed:
            for start in starts:
                batch = order[start:start + self.batch_size]
                yield self.train_inputs[batch], self.train_targets[batch]
            return
        self.train_batches_to_read = [order[start:start + self.batch_size].tolist() for start in starts]
        yield from self.read(self.train_loader, "training")

    def valid_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every validation example once, in batches of --batch-size, on the device."""
        if not self.streamed:
            for start in range(0, self.valid_size, self.batch_size):
                yield (self.valid_inputs[start:start + self.batch_size],
                       self.valid_targets[start:start + self.batch_size])
            return
        yield from self.read(self.valid_loader, "validation")

    def read(self, loader, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(loader)
        while True:
            try:
                inputs, targets = next(batches)
            except StopIteration:
                return
            except Exception as error:
                if self.on_read_error is None:
                    raise
                logger.debug(f"Reading a {split} batch failed", exc_info=True)
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                self.on_read_error(f"reading a {split} batch of the data set failed: "
                                   f"{lines[-1] if lines else type(error).__name__}")
            yield self.to_device(inputs, targets)

    def sample(self, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `n` training examples, on the device: to check the model and shape CUDA-graph buffers."""
        if not self.streamed:
            return self.train_inputs[:n], self.train_targets[:n]
        items = [as_tensors(self.train[i]) for i in range(n)]
        return self.to_device(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

    def to_device(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # non_blocking from pinned memory: the copy overlaps the GPU's work on the previous batch.
        return (inputs.to(self.device, non_blocking=True),
                targets.to(self.device, self.target_dtype, non_blocking=True))


class _BatchesToRead(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: the current epoch's remaining batches, set by Data.train_batches."""

    def __init__(self, data: Data):
        self.data = data

    def __iter__(self):
        return iter(self.data.train_batches_to_read)

    def __len__(self):
        return len(self.data.train_batches_to_read)


# --- Checks: each raises DataProblem, which the trial turns into one error line --------------------


def declared_classes(loaded: dict) -> int | None:
    classes = loaded.get("classes")
    if classes is None:
        return None
    if isinstance(classes, bool) or not isinstance(classes, (int, np.integer)) or classes < 2:
        raise DataProblem(f"declare classes={classes!r}: a classification needs an integer number of classes >= 2 "
                          "(for a regression, return no `classes`)")
    return int(classes)


def array(loaded: dict, key: str) -> torch.Tensor:
    value = loaded[key]
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    except (TypeError, ValueError) as error:
        raise DataProblem(f"give `{key}` as a {type(value).__name__} that is not an array of numbers ({error}): "
                          "return numpy arrays or torch tensors") from None
    if tensor.ndim == 0:
        raise DataProblem(f"give `{key}` as a single number: give one row per example")
    if tensor.dtype == torch.float64:
        tensor = tensor.float()  # What the model trains in; half the memory.
    return tensor


def resident_split(loaded: dict) -> tuple[torch.Tensor, ...]:
    """(train inputs, train targets, valid inputs, valid targets): the module's own split, or the fixed one."""
    missing = {"inputs", "targets"} - loaded.keys()
    if missing:
        raise DataProblem(f"have no `{sorted(missing)[0]}`: load() must return {FORMS}")
    inputs, targets = array(loaded, "inputs"), array(loaded, "targets")
    check_pair(inputs, targets, "inputs", "targets")
    if "valid_inputs" in loaded or "valid_targets" in loaded:
        if not {"valid_inputs", "valid_targets"} <= loaded.keys():
            raise DataProblem("give only one of `valid_inputs` and `valid_targets`: give both, or neither")
        valid_inputs, valid_targets = array(loaded, "valid_inputs"), array(loaded, "valid_targets")
        check_pair(valid_inputs, valid_targets, "valid_inputs", "valid_targets")
        if (valid_inputs.shape[1:], valid_inputs.dtype) != (inputs.shape[1:], inputs.dtype) or \
                (valid_targets.shape[1:], valid_targets.dtype) != (targets.shape[1:], targets.dtype):
            raise DataProblem(
                f"have validation inputs {tuple(valid_inputs.shape[1:])} {valid_inputs.dtype} and targets "
                f"{tuple(valid_targets.shape[1:])} {valid_targets.dtype} unlike the training ones, "
                f"{tuple(inputs.shape[1:])} {inputs.dtype} and {tuple(targets.shape[1:])} {targets.dtype}")
        return inputs, targets, valid_inputs, valid_targets
    train, valid = fixed_split(len(inputs))
    return inputs[train], targets[train], inputs[valid], targets[valid]


def fixed_split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_valid = int(VALIDATION_FRACTION * n)
    return order[:n - n_valid], order[n - n_valid:]


def streamed_split(loaded: dict):
    dataset = loaded["dataset"]
    for key in ("dataset", "valid_dataset"):
        if key in loaded and not (isinstance(loaded[key], torch.utils.data.Dataset) and hasattr(loaded[key], "__len__")):
            raise DataProblem(f"give `{key}` as a {type(loaded[key]).__name__}: it must be a torch Dataset with a "
                              "length (torch.utils.data.Dataset, e.g. torchvision's ImageFolder)")
    if "inputs" in loaded:
        raise DataProblem(f"give both `inputs` and `dataset`: load() must return {FORMS}")
    if len(dataset) == 0:
        raise DataProblem("have an empty `dataset`")
    if "valid_dataset" in loaded:
        return dataset, loaded["valid_dataset"]
    train, valid = fixed_split(len(dataset))
    return torch.utils.data.Subset(dataset, train.tolist()), torch.utils.data.Subset(dataset, valid.tolist())


def as_tensors(item) -> tuple[torch.Tensor, torch.Tensor]:
    """A Dataset's item as (input, target) tensors, as the DataLoader's collation makes them."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise DataProblem(f"have a `dataset` whose items are {type(item).__name__}s: each must be an (input, target) pair")
    batch = torch.utils.data.default_collate([tuple(item)])
    return batch[0][0], batch[1][0]


def check_item_is_stable(dataset, first_input: torch.Tensor, first_target: torch.Tensor) -> None:
    """Reads the first item again under other seeds of every random generator a Dataset may draw
    from (torch's, numpy's, Python's): a random transform (a flip with p=0.5) differs at least once
    in 12 reads but for 1 chance in 2,048. The trial's own random states are left as they were."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            for seed in range(1, 13):
                random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
                again_input, again_target = as_tensors(dataset[0])
                if not (torch.equal(first_input, again_input) and torch.equal(first_target, again_target)):
                    raise DataProblem(
                        "have a `dataset` whose first item differs from one read to the next: random augmentation "
                        "in the Dataset would make a resumed trial train on other batches; do it in the data set "
                        "module's augment(), on the device")
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def check_pair(inputs: torch.Tensor, targets: torch.Tensor, input_key: str, target_key: str) -> None:
    if inputs.dtype == torch.bool or inputs.is_complex():
        raise DataProblem(f"give `{input_key}` of type {inputs.dtype}: give numbers (integers or floats)")
    if len(inputs) != len(targets):
        raise DataProblem(f"have {len(inputs)} `{input_key}` but {len(targets)} `{target_key}`: one target per input")


def target_dtype(dtype: torch.dtype) -> torch.dtype:
    # Class indices as int64 (what cross_entropy takes); float targets as float32, never truncated.
    return torch.int64 if not dtype.is_floating_point else torch.float32


def check_targets(targets: torch.Tensor, classes: int | None) -> None:
    if classes is None:
        if not targets.dtype.is_floating_point:
            raise DataProblem(f"have {str(targets.dtype).removeprefix('torch.')} targets and declare no classes: for "
                              "a classification return classes=K (targets in 0..K-1); for a regression, float targets")
        return
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise DataProblem(f"declare {classes} classes but have {str(targets.dtype).removeprefix('torch.')} targets: "
                          "a classification's targets are class indices (integers); for a regression, return no classes")
    if targets.ndim != 1:
        raise DataProblem(f"declare {classes} classes but have targets of shape {tuple(targets.shape[1:])} per "
                          "example: one class index per example")
    if len(targets) and (targets.min() < 0 or targets.max() >= classes):
        raise DataProblem(f"have targets from {int(targets.min())} to {int(targets.max())}, but {classes} classes "
                          f"need targets in 0..{classes - 1}")


def statistics(loaded: dict, input_shape: tuple, device: torch.device):
    """`mean` and `std` as tensors shaped to standardize a batch (one value per channel), or (None, None)."""
    if ("mean" in loaded) != ("std" in loaded):
        raise DataProblem("give only one of `mean` and `std`: give both (inputs standardized), or neither")
    if "mean" not in loaded:
        return None, None
    try:
        mean = torch.tensor(np.asarray(loaded["mean"], dtype=np.float64).reshape(-1), dtype=torch.float32)
        std = torch.tensor(np.asarray(loaded["std"], dtype=np.float64).reshape(-1), dtype=torch.float32)
    except (TypeError, ValueError) as error:
        raise DataProblem(f"give a `mean` or `std` that is not numbers ({error}): one number per channel") from None
    channels = input_shape[0] if input_shape else 1
    if len(mean) != channels or len(std) != channels:
        raise DataProblem(f"have {channels} channel(s) (inputs of shape {input_shape}), but the data set's mean "
                          f"{loaded['mean']} and std {loaded['std']} have {len(mean)} and {len(std)} values: give "
                          "one mean and one std per channel (an input's first axis: images channels first)")
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise DataProblem(f"have a std of {std.min().item()} in the data set's std {loaded['std']}: each channel's "
                          "std must be positive and finite")
    view = (1, channels, *[1] * (len(input_shape) - 1)) if input_shape else (1,)
    return mean.view(view).to(device), std.view(view).to(device)
