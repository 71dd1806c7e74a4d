"""What a trial says: plain log lines (and train.log), one error line for bad input (`fail`), the GPU's
out-of-memory advice, peak memory, and Oríon's results file ($ORION_RESULTS_PATH), written without
importing Oríon.
"""


import logging
import math
import resource
import sys
from pathlib import Path
from typing import NoReturn

import rich.logging
import torch

from .reservation import write_results



logger = logging.getLogger("main")

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



def report_objective(name: str, objective: float) -> None:
    """Writes the objective where Oríon reads it: the file named by $ORION_RESULTS_PATH.

    The file `orion.client.report_objective(objective, name)` writes (Oríon's documented results
    protocol; tests/test_orion.py checks they match), without importing Oríon: seconds per trial,
    and every trial is a fresh process. Oríon keeps the name with the value in its database,
    where the report and the job's summary read it.
    """
    objective = float(objective)  # Oríon rejects numpy and torch numbers.
    write_results([{"name": name, "type": "objective", "value": objective}])
    logger.info(f"Objective ({name}): {objective:.4f}")

