"""The command line's fixed part (`argument_parser`: --seed, --data-dir, --checkpoint-dir, --compile,
--cuda-graph, --loader-workers) and the checks main.py's hyperparameters use (`int_at_least`,
`number_in`, ...): one error line per mistake, exit 2.
"""


import argparse
import math
import os
from pathlib import Path


from .data import default_loader_workers



# Arguments that may differ when a trial resumes from its checkpoint: a multi-fidelity algorithm
# promotes a trial to more --epochs, and paths differ between nodes. Every other argument (every
# hyperparameter, including one you add) must match the checkpoint's.
MAY_CHANGE_ON_RESUME = {"epochs", "data_dir", "checkpoint_dir", "compile", "cuda_graph", "loader_workers"}

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


