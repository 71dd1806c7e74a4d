"""The trial: its device and settings, its data (data.py), the training loop's steps (the epoch, the
end of an epoch, the report), the objective and what a diverged run reports.
"""


import contextlib
import functools
import inspect
import json
import logging
import math
import os
import random
import socket
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
from tqdm import tqdm

from .data import FORMS, Data, DataProblem
from .checkpoints import (TrainingState, load_checkpoint, save_and_exit_interrupted, save_checkpoint_and_metrics,
                          set_rng_states, write_metrics)
from .cuda_graph import CudaGraphTrainStep
from .logs import fail, finite_or_none, out_of_memory_message, peak_memory_gib, report_objective, setup_logging
from .signals import StopSignal


logger = logging.getLogger("main")

# --- The trial: device, data, checkpoints, signals, metrics, report ------------------------------



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
        batches on the device (data.py). Whatever goes wrong is one error line."""
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


