"""What every trial of main.py does besides training, kept as it is when you make main.py yours.

- The command line's fixed part and its checks: one error line per mistake (`argument_parser`).
- The device and its settings: bf16 autocast and channels_last on a GPU, float32 on a CPU.
- The data (trial_data.py): what the data set module returns, checked against what it declares,
  split, and served in batches on the device, held there whole or streamed from disk.
- Checkpoints: everything that influences the result (model, optimizer, RNG states, the epoch's
  order and position) saved every epoch and on a stop signal, so a resumed trial reproduces the
  uninterrupted one exactly; written through a temporary name per host and process, then renamed.
- Preemption: SIGTERM/SIGUSR1/SIGINT are noted, acted on between two steps: save, exit 130
  (Oríon then marks the trial `interrupted` and hands it, same folder, to the next worker).
- The objective: main.py's `objective(metrics)` of each epoch's metrics, a diverged run's stand-in
  value (`Trial.report`), metrics.jsonl (one JSON line per epoch: what plots, tests and benchmarks
  read), train.log, and Oríon's results file ($ORION_RESULTS_PATH), written without importing Oríon.
- The CUDA-graph replay of the training step (--cuda-graph), torch.compile (--compile).
"""

import argparse
import contextlib
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import random
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import rich.logging
import torch
from tqdm import tqdm

from trial_data import FORMS, SPLIT_SEED, VALIDATION_FRACTION, Data, DataProblem, default_loader_workers  # noqa: F401

logger = logging.getLogger("main")

# Oríon marks a trial that exits with this code `interrupted` (not `broken`) and hands it, with
# the same working directory, to the next free worker. Oríon tells us the code it uses.
INTERRUPTED_EXIT_CODE = int(os.environ.get("ORION_INTERRUPT_CODE", 130))
# Arguments that may differ when a trial resumes from its checkpoint: a multi-fidelity algorithm
# promotes a trial to more --epochs, and paths differ between nodes. Every other argument (every
# hyperparameter, including one you add) must match the checkpoint's.
MAY_CHANGE_ON_RESUME = {"epochs", "data_dir", "checkpoint_dir", "compile", "cuda_graph", "loader_workers"}
CHECKPOINT_FORMAT = 3  # Bump when the checkpoint's contents change.


# --- The command line -----------------------------------------------------------------------------


class OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message):
        # argparse prints the whole usage before the error; one line is easier to spot in a
        # Slurm log shared by several workers.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the arguments every trial has; main.py adds its hyperparameters."""
    default_data_dir = Path(os.environ["SLURM_TMPDIR"], "data") if "SLURM_TMPDIR" in os.environ else Path("data")
    parser = OneLineErrorParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        # No abbreviations: `--learning 0.1` after job.sh would pass its check for searched
        # arguments, then lose silently to Oríon's `--learning-rate VALUE` on the same line.
        allow_abbrev=False,
    )
    parser.add_argument("--seed", type=int_at_least(0, maximum=2**32 - 1), default=42)  # numpy's range.
    parser.add_argument("--data-dir", type=Path, default=default_data_dir,
                        help="the staged data set (default: $SLURM_TMPDIR/data, else ./data)")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=os.environ.get("ORION_WORKING_DIR"),
        help="where to keep checkpoint.pt, metrics.jsonl and train.log, and resume from "
        "(default: the Oríon trial's working directory, $ORION_WORKING_DIR; none outside Oríon)",
    )
    parser.add_argument(
        "--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile the model for training, in this mode (CUDA only; costs compile time in every trial)",
    )
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=False,
                        help="replay the whole training step as one CUDA graph (CUDA only; see CudaGraphTrainStep)")
    parser.add_argument("--loader-workers", type=int_at_least(0), default=default_loader_workers(),
                        help="DataLoader worker processes, for a data set streamed from disk (default: the task's "
                        "--cpus-per-task, $SLURM_CPUS_PER_TASK, else this machine's CPUs)")
    return parser


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


def number_in(low: float, high: float = math.inf, low_open: bool = False):
    """A float in [low, high] ((low, high] with low_open); its error names the range."""
    def parse(text: str) -> float:
        value = float(text)
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            if high == math.inf:
                wanted = "a positive number" if (low, low_open) == (0, True) else f"a number >= {low}"
                wanted = "zero or a positive number" if (low, low_open) == (0, False) else wanted
            else:
                wanted = f"a number in {'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value
    parse.__name__ = "number"  # "invalid number value: 'abc'"
    return parse


positive_float = number_in(0, low_open=True)
non_negative_float = number_in(0)


# --- The trial: device, data, checkpoints, signals, metrics, report ------------------------------


@dataclasses.dataclass
class TrainingState:
    """Where the run is, besides the model's and optimizer's own state."""

    epoch: int = 0  # Epochs completed.
    step: int = 0  # Steps done in the current epoch.
    diverged: bool = False
    epoch_order: torch.Tensor | None = None  # The current epoch's shuffled order of the training examples.
    train_loss_sum: torch.Tensor | None = None  # Summed over the current epoch's examples so far.
    history: list[dict] = dataclasses.field(default_factory=list)  # One metrics record per epoch.
    untrained_objective: float | None = None  # What a diverged run reports (see Trial.report).


class Trial:
    """One run of main.py: its arguments, objective, device, folder, stop signal and clock."""

    def __init__(self, args, objective_name: str = "objective", objective=None):
        self.args, self.started = args, time.perf_counter()
        self.objective_name, self.objective = objective_name, objective
        self.stop = StopSignal()  # Notes a signal once `start` installs it (not in tests and benchmarks).
        if torch.cuda.is_available():
            # bf16 autocast and channels_last are what the GPU's tensor cores are fast at; bf16 has
            # float32's range, so unlike fp16 it needs no loss scaling. No cudnn.benchmark: it
            # gained nothing per step on an H200 and autotuned each new shape for seconds in every
            # trial (benchmarks/RESULTS.md, "Step time").
            self.device, self.use_bf16, self.memory_format = torch.device("cuda"), True, torch.channels_last
        else:
            logger.warning("No GPU found: training on the CPU, which is fine for a quick check but slow")
            self.device, self.use_bf16, self.memory_format = torch.device("cpu"), False, torch.contiguous_format
        self.use_cuda_graph = args.cuda_graph and self.device.type == "cuda" and not args.compile
        self.ready_seconds = self.epoch_started = self.train_seconds = 0.0
        self.trained_examples = 0

    @classmethod
    def start(cls, args, objective_name: str, objective) -> "Trial":
        """Logging (and train.log in --checkpoint-dir), the stop signal, the seeds, the device.
        `objective(metrics) -> float` is what Oríon minimizes, shown as `objective_name`."""
        setup_logging(args.checkpoint_dir)
        logger.info(f"Args: {json.dumps(vars(args), default=str)}")
        if "SLURM_JOB_ID" in os.environ:
            logger.info(f"Running in Slurm job {os.environ['SLURM_JOB_ID']} on {socket.gethostname()}")
        random.seed(args.seed)
        np.random.seed(args.seed)
        torch.manual_seed(args.seed)
        trial = cls(args, objective_name, objective)
        trial.stop.install()
        return trial

    # The device's settings, for main.py's model, optimizer and step.
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(device=self.device, memory_format=self.memory_format)

    @property
    def optimizer_options(self) -> dict:
        """fused: one kernel for the whole update (the step is launch-bound on a GPU; Adam, AdamW
        and SGD have it); capturable, only with --cuda-graph: the graph replays the update with its
        step count kept on the GPU (Adam and AdamW have it; for another optimizer, no --cuda-graph)."""
        return {**({"fused": True} if self.device.type == "cuda" else {}),
                **({"capturable": True} if self.use_cuda_graph else {})}

    @contextlib.contextmanager
    def failing_on_gpu_out_of_memory(self):
        """A GPU out of memory is one error line and exit 1; the last checkpoint is kept as it is."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as error:
            fail(out_of_memory_message(error, self.device))

    def load_data(self, load) -> Data:
        """The data set module's `load(data_dir)`, checked against what it declares, split, ready to serve
        batches on the device (trial_data.py). Whatever goes wrong is one error line."""
        data_dir, module = self.args.data_dir, f"{Path(inspect.getsourcefile(load) or '?').name}"
        try:
            loaded = load(data_dir)
        except Exception as error:  # A truncated or garbage file can raise almost anything (BadZipFile, pickle's).
            logger.debug("The data set's load() failed", exc_info=True)
            # The module's own message names the file (cifar10.DataError); any other gets named here.
            named = isinstance(error, ValueError) and str(data_dir) in str(error)
            fail(str(error) if named else f"{module}'s load({data_dir}) failed: {one_line(error)}; check the files "
                 f"there (stage them again) or the module's load()")
        module_object = inspect.getmodule(load)
        if getattr(self.args, "augment", False) and not hasattr(module_object, "augment"):
            fail(f"--augment, but {module} has no augment(inputs): add one (README, \"Make it yours\"), or drop "
                 "--augment and its line in main.py's train_step")
        if not isinstance(loaded, dict):
            fail(f"{module}'s load() returned a {type(loaded).__name__}: it must return a dict with {FORMS} "
                 "(README, \"Make it yours\")")
        try:
            data = Data(loaded, self.device, self.memory_format, self.args.batch_size, self.args.loader_workers,
                        on_read_error=fail)
        except DataProblem as problem:
            fail(f"the data that {module} loads from {data_dir} {problem}")
        except Exception as error:  # A streamed Dataset's first item, read to check it.
            logger.debug("Reading the data set's first example failed", exc_info=True)
            fail(f"reading the first example of {module}'s dataset from {data_dir} failed: {one_line(error)}")
        logger.info(f"Data: {data.describe()}")
        self.data = data
        return data

    def resume_or_start(self, model, optimizer, validate) -> TrainingState:
        """The state of --checkpoint-dir/checkpoint.pt, loaded into the model and optimizer, or a new one.

        A new run first scores its untrained model (`validate()`, one pass over the validation
        set): what it reports should it diverge (see `report`).
        """
        folder = self.args.checkpoint_dir
        checkpoint = load_checkpoint(folder / "checkpoint.pt", self.args) if folder else None
        if checkpoint is None:
            metrics = validate()
            untrained = self.objective_of(metrics)
            if not math.isfinite(untrained):
                fail(f"the objective of the untrained model is {untrained} ({format_metrics(metrics)}): evaluate() "
                     "must give finite metrics before any training")
            logger.info(f"Before training: {format_metrics(metrics)}; {self.objective_name}: {untrained:.4g}")
            return TrainingState(untrained_objective=untrained)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_states(checkpoint["rng"])
        state = TrainingState(**checkpoint["training_state"])
        if state.epoch_order is not None:
            state.epoch_order, state.train_loss_sum = self.data.order_to_device(state.epoch_order), \
                state.train_loss_sum.to(self.device)
        logger.info(f"Resuming training at epoch {state.epoch}" + (f", step {state.step}" if state.step else ""))
        write_metrics(folder, state)  # In case the last run was killed before writing them.
        return state

    def make_step(self, train_step, model, optimizer, data: Data):
        """`step(inputs, targets) -> summed loss`: main.py's train_step(model, optimizer, inputs, targets,
        args, data, trial) as it is, torch.compile'd (--compile), or replayed as a CUDA graph (--cuda-graph)."""
        args = self.args
        if args.cuda_graph and not self.use_cuda_graph:
            logger.warning("--cuda-graph needs a GPU and no --compile: training without the graph")
        if args.compile and self.device.type != "cuda":
            logger.warning("--compile needs a GPU: training without it")
        step_model = torch.compile(model, mode=args.compile) if args.compile and self.device.type == "cuda" else model
        check_model_output(model, data)
        step = functools.partial(train_step, step_model, optimizer, args=args, data=data, trial=self)
        if self.use_cuda_graph:
            step = CudaGraphTrainStep(step, optimizer, args.batch_size, *data.sample(1))
        self.ready_seconds = time.perf_counter() - self.started
        logger.info(f"Training on {self.device.type}: {steps_per_epoch(data, args)} steps per epoch; ready after "
                    f"{self.ready_seconds:.1f} s")
        return step

    def train_one_epoch(self, state: TrainingState, model, optimizer, step, data: Data) -> None:
        """Trains from `state.step` to the end of the epoch; on a stop signal, saves and exits 130."""
        self.epoch_started = time.perf_counter()
        model.train()
        if state.epoch_order is None:  # A fresh epoch (a resumed one keeps its saved order and loss sum).
            state.epoch_order = data.new_epoch_order()
            state.train_loss_sum = torch.zeros((), device=self.device)
        n_steps = steps_per_epoch(data, self.args)
        self.trained_examples = 0
        progress_bar = tqdm(total=n_steps, initial=state.step, desc=f"Train epoch {state.epoch}",
                            disable=not sys.stdout.isatty())  # No progress bars in Slurm's log files.
        batches = data.train_batches(state.epoch_order, state.step)
        while state.step < n_steps and not self.stop.received:
            inputs, targets = next(batches)
            state.step += 1
            if len(inputs) < 2:
                continue  # The last batch holds one example: BatchNorm cannot train on it.
            # Summed on the device: reading the loss every step would make the CPU wait for the
            # GPU. It is read once per epoch.
            state.train_loss_sum += step(inputs, targets)
            self.trained_examples += len(inputs)
            progress_bar.update(1)
        batches.close()  # A streamed epoch cut short by a signal: its workers stop reading ahead.
        progress_bar.close()
        if self.stop.received:
            self.save_and_exit_interrupted(state, model, optimizer)
        # A diverged run (loss NaN or inf, e.g. a learning rate of 1.0) is still a result for
        # Oríon: see `report`. (.item() waits for the GPU.)
        state.diverged = not torch.isfinite(state.train_loss_sum).item()
        self.train_seconds = time.perf_counter() - self.epoch_started

    def end_epoch(self, state: TrainingState, model, optimizer, metrics: dict) -> None:
        """Logs the epoch and its metrics (evaluate's), adds its record to metrics.jsonl, saves the checkpoint."""
        val_seconds = time.perf_counter() - self.epoch_started - self.train_seconds
        objective = self.objective_of(metrics)
        state.diverged = state.diverged or not math.isfinite(objective)
        if state.diverged:
            logger.warning(f"Training diverged in epoch {state.epoch} (loss or objective not finite); stopping early")
        logger.info(f"Epoch {state.epoch}: {format_metrics(metrics)}; {self.objective_name}: {objective:.4g}")
        examples_per_second = self.trained_examples / self.train_seconds
        logger.info(f"Epoch {state.epoch} trained in {self.train_seconds:.2f} s ({examples_per_second:.0f} examples/s), "
                    f"validated in {val_seconds:.2f} s")
        data = self.data
        # Every example but a last batch of one, which train_one_epoch skips.
        epoch_examples = data.train_size - (1 if data.train_size % self.args.batch_size == 1 else 0)
        peak_host_gib, peak_gpu_gib = peak_memory_gib(self.device)
        state.history.append({
            "epoch": state.epoch,
            "train_loss": finite_or_none(state.train_loss_sum.item() / epoch_examples),
            **{name: finite_or_none(value) for name, value in metrics.items()},
            "objective": finite_or_none(objective),
            "untrained_objective": state.untrained_objective,  # What a diverged run reports.
            "train_seconds": self.train_seconds,  # This process's part of the epoch, if it resumed mid-epoch.
            "val_seconds": val_seconds,
            "examples_per_second": examples_per_second,
            "trained_examples": self.trained_examples,
            "train_examples": data.train_size,
            "valid_examples": data.valid_size,
            "ready_seconds": self.ready_seconds,  # main() started (after the imports) -> first training step.
            "seconds_since_start": time.perf_counter() - self.started,  # Of this process.
            "device": self.device.type,
            "streamed": data.streamed,
            "peak_host_gib": peak_host_gib,
            "peak_gpu_gib": peak_gpu_gib,
            "diverged": state.diverged,
            "end_time": time.time(),
        })
        state.epoch, state.step, state.epoch_order, state.train_loss_sum = state.epoch + 1, 0, None, None
        save_checkpoint_and_metrics(self.args.checkpoint_dir, state, model, optimizer, self.args)

    def objective_of(self, metrics) -> float:
        """main.py's objective(metrics), checked: evaluate() returns a dict of named numbers."""
        if not (isinstance(metrics, dict) and metrics and all(isinstance(k, str) for k in metrics)):
            fail(f"evaluate() returned {type(metrics).__name__} {str(metrics)[:80]}: it must return a dict of "
                 "metrics by name, e.g. {\"val_loss\": 0.52, \"val_accuracy\": 0.83}")
        clashes = sorted(set(metrics) & RECORD_FIELDS)
        if clashes:
            fail(f"evaluate() returned a metric named {clashes[0]!r}, a name metrics.jsonl keeps for itself: rename "
                 "it (e.g. val_" + clashes[0] + ")")
        try:
            metrics = {name: float(value) for name, value in metrics.items()}
            return float(self.objective(metrics))
        except (TypeError, ValueError, KeyError) as error:
            fail(f"objective(metrics) failed on evaluate()'s metrics {sorted(metrics)} ({type(error).__name__}: "
                 f"{error}): it must compute one number from them")

    def save_and_exit_interrupted(self, state, model, optimizer) -> NoReturn:
        save_and_exit_interrupted(self.args.checkpoint_dir, state, model, optimizer, self.args, self.stop.received)

    def reported_epoch(self, state: TrainingState) -> dict:
        """The last epoch's metrics record; from a checkpoint that trained further (an ASHA
        promotion's parent, copied), epoch --epochs."""
        if len(state.history) > self.args.epochs:
            logger.info(f"The checkpoint already holds {len(state.history)} epochs; reporting epoch {self.args.epochs - 1}")
        return state.history[min(self.args.epochs, len(state.history)) - 1]

    def report(self, state: TrainingState) -> None:
        """Reports the last epoch's objective to Oríon, and logs the trial's peak memory.

        A diverged run (a loss or metric not finite) reports its untrained model's objective: a
        finite value, on the objective's own scale, no better than not training at all. That is
        what the search must learn from it, and it keeps the trial `completed` (a crash would
        make it `broken`, and enough of them stop the search at max_broken).
        """
        objective = self.reported_epoch(state)["objective"]
        if objective is None:
            objective = state.untrained_objective
            logger.warning(f"The run diverged: reporting its untrained model's {self.objective_name}, {objective:.4g}")
        report_objective(self.objective_name, objective)
        peak_host_gib, peak_gpu_gib = peak_memory_gib(self.device)  # To size --mem and --mem-per-gpu.
        logger.info(f"Peak memory: host {peak_host_gib:.2f} GiB, GPU {peak_gpu_gib:.2f} GiB")


# What each metrics.jsonl record holds besides evaluate()'s metrics.
RECORD_FIELDS = {"epoch", "train_loss", "objective", "untrained_objective", "train_seconds", "val_seconds", "examples_per_second",
                 "trained_examples", "train_examples", "valid_examples", "ready_seconds", "seconds_since_start",
                 "device", "streamed", "peak_host_gib", "peak_gpu_gib", "diverged", "end_time"}


def format_metrics(metrics: dict) -> str:
    return ", ".join(f"{name}: {float(value):.4g}" for name, value in metrics.items())


def one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"


@torch.no_grad()
def check_model_output(model, data: Data) -> None:
    """The model takes two of the data's inputs and gives `data.classes` scores each (a classification)
    or one output shaped like a target (a regression): else one error line now, rather than a
    traceback in every trial or, worse, a loss that broadcasts a wrong shape without a word. In eval
    mode: no dropout, BatchNorm's statistics untouched."""
    inputs, targets = data.sample(2)
    was_training = model.training
    model.eval()
    try:
        outputs = model(data.prepare(inputs))
    except RuntimeError as error:
        fail(f"build_model's model cannot take the data's inputs of shape {tuple(inputs.shape[1:])} "
             f"{str(inputs.dtype).removeprefix('torch.')} ({' '.join(str(error).split())[:300]}): make its first "
             "layer fit them")
    finally:
        model.train(was_training)
    per_example = tuple(getattr(outputs, "shape", (None,))[1:])
    if data.classes is not None and tuple(outputs.shape) != (2, data.classes):
        fail(f"build_model's model gives outputs of shape {per_example} per example, and the data set has "
             f"{data.classes} classes: make its last layer give data.classes values")
    if data.classes is None and tuple(outputs.shape) != tuple(targets.shape):
        fail(f"build_model's model gives outputs of shape {per_example} per example, and the data set's targets "
             f"have shape {tuple(targets.shape[1:])}: make them match (e.g. .squeeze(-1) for one number), or a "
             "loss would broadcast them silently")


def steps_per_epoch(data: Data, args) -> int:
    return math.ceil(data.train_size / args.batch_size)


# --- Checkpoints ----------------------------------------------------------------------------------
# A preempted job is killed (and requeued) with little or no notice; Oríon hands the interrupted
# trial, with the same working directory, to the next worker, which resumes here. Everything that
# influences the result is saved, RNG states included, so a resumed run reproduces the
# uninterrupted one exactly (tested on the CPU).


def run_identity(args) -> dict:
    """What a checkpoint must match to continue this run: every argument that can change the result."""
    return {name: value for name, value in vars(args).items() if name not in MAY_CHANGE_ON_RESUME}


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
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_states(),
    }
    try:
        # A kill at any moment leaves either the previous checkpoint or the new one, never a
        # truncated file.
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

    Should Oríon hand a trial to a second worker while the first still runs (a lost heartbeat),
    a shared name would mix their two writes into one corrupt file.
    """
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")  # pids repeat across nodes.


def save_and_exit_interrupted(checkpoint_dir, state, model, optimizer, args, signum: int) -> NoReturn:
    if save_checkpoint_and_metrics(checkpoint_dir, state, model, optimizer, args):
        logger.warning(f"Got signal {signum}: saved checkpoint at epoch {state.epoch}, step {state.step}; exiting")
    else:
        logger.warning(f"Got signal {signum}: exiting without a new checkpoint (progress since the last one is lost)")
    # Interrupted, not broken, whether or not the save worked: the trial resumes from its last
    # checkpoint (or from scratch), and Oríon does not count it toward max_broken.
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


# --- Preemption: a stop signal is noted, and acted on at the next step -----------------------------


class StopSignal:
    """Slurm sends SIGTERM (or job.sh forwards one) a while before it kills the job.

    The handler only notes it; the training loop checks `received` between steps, then saves a
    checkpoint and exits with Oríon's "interrupted" code.
    """

    def __init__(self):
        self.received: int | None = None

    def handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def install(self) -> None:
        # SIGINT too: Ctrl-C under `bash job.sh` reaches every process of the terminal, and a
        # trial killed by KeyboardInterrupt would be marked broken instead of interrupted.
        for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(signum, self.handle)


# --- The CUDA-graph step ---------------------------------------------------------------------------


class CudaGraphTrainStep:
    """The whole training step (forward, loss, backward, optimizer) captured once as a CUDA graph.

    A ResNet18 step at batch 128 launches hundreds of small kernels; from Python that takes longer
    than the GPU needs to run them. Replaying a graph launches them all at once. This follows
    PyTorch's "whole-network capture" recipe (CUDA semantics notes): a few eager steps on a side
    stream first, static input buffers that every batch is copied into (shaped and typed like the
    data's), a capturable optimizer, and no host sync inside. The graph has a fixed batch size:
    the last, smaller batch of an epoch runs eagerly. If capture fails, it warns once and trains
    eagerly.
    """

    EAGER_STEPS_BEFORE_CAPTURE = 3  # Allocate cuDNN/cuBLAS workspaces and the optimizer state.

    def __init__(self, eager_step, optimizer, batch_size: int, inputs: torch.Tensor, targets: torch.Tensor):
        self.eager_step, self.optimizer, self.batch_size = eager_step, optimizer, batch_size
        self.inputs = inputs.new_zeros((batch_size, *inputs.shape[1:]))
        self.targets = targets.new_zeros((batch_size, *targets.shape[1:]))
        self.graph, self.loss, self.eager_steps, self.failed = None, None, 0, False

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if len(inputs) != self.batch_size or self.failed:
            return self.eager_step(inputs, targets)
        if self.graph is None and self.eager_steps < self.EAGER_STEPS_BEFORE_CAPTURE:
            self.eager_steps += 1
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                loss = self.eager_step(inputs, targets)
            torch.cuda.current_stream().wait_stream(side_stream)
            return loss
        if self.graph is None and not self.capture():
            return self.eager_step(inputs, targets)
        self.inputs.copy_(inputs)
        self.targets.copy_(targets)
        self.graph.replay()
        return self.loss  # Overwritten by the next replay: the caller adds it up at once.

    def capture(self) -> bool:
        try:
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # Gradients then live in the graph's memory pool.
            with torch.cuda.graph(graph):
                self.loss = self.eager_step(self.inputs, self.targets)
        except Exception as error:  # Capture refuses any host sync or CPU-GPU copy inside the step.
            logger.warning(f"Could not capture the training step in a CUDA graph ({type(error).__name__}: "
                           f"{error}); training without it")
            self.failed = True
            return False
        self.graph = graph
        return True


# --- Logging, errors, metrics and the report to Oríon ----------------------------------------------


def setup_logging(checkpoint_dir: Path | None) -> None:
    if sys.stdout.isatty():
        console: logging.Handler = rich.logging.RichHandler()
    else:
        # Plain lines in Slurm's output files: rich would wrap them (and a crash's traceback)
        # at its width, mid-path; the level shows where it is not INFO.
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(LevelPrefixFormatter())
    handlers = [console]
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


class LevelPrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def fail(message: str) -> NoReturn:
    """Bad input: one error line on stderr (and in the trial's log), exit code 1, no traceback."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.emit(logging.makeLogRecord({"msg": f"error: {message}", "levelname": "ERROR"}))
    sys.exit(f"error: {message}")


def out_of_memory_message(error: torch.cuda.OutOfMemoryError, device: torch.device) -> str:
    """The GPU was full: what this trial held of it, and what to change.

    A configuration that does not fit exits 1, as the other errors of `fail`: Oríon marks the
    trial broken rather than hand it, unchanged, to a worker that would run out again.
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


def report_objective(name: str, objective: float) -> None:
    """Writes the objective where Oríon reads it: the file named by $ORION_RESULTS_PATH.

    The file `orion.client.report_objective(objective, name)` writes (Oríon's documented results
    protocol; tests/test_orion.py checks they match), without importing Oríon: seconds per trial,
    and every trial is a fresh process. Oríon keeps the name with the value in its database,
    where the report and the job's summary read it.
    """
    objective = float(objective)  # Oríon rejects numpy and torch numbers.
    results_path = os.environ.get("ORION_RESULTS_PATH")
    if results_path:
        with open(results_path, "w") as file:
            json.dump([{"name": name, "type": "objective", "value": objective}], file)
    logger.info(f"Objective ({name}): {objective:.4f}")
