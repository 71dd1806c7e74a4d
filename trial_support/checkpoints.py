"""Checkpoints: everything that influences the result (model, optimizer, RNG states, the epoch's order
and position) saved every epoch and on a stop signal, so that a resumed trial reproduces the
uninterrupted one exactly; written through a temporary name per host and process, then renamed;
metrics.jsonl always beside its checkpoint.
"""


import dataclasses
import json
import logging
import os
import random
import socket
import sys
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

from .arguments import MAY_CHANGE_ON_RESUME
from .reservation import exit_if_taken_over
from .logs import fail
from .signals import INTERRUPTED_EXIT_CODE


logger = logging.getLogger("main")

CHECKPOINT_FORMAT = 3  # Bump when the checkpoint's contents change.

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
    exit_if_taken_over("saving a checkpoint")
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


