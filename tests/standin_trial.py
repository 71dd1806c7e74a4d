"""A light stand-in for main.py, for tests of the search machinery (budget, workers, database).

Runs in a fraction of a second instead of main.py's import of torch: sleeps --sleep seconds,
then reports a made-up objective to Oríon through its results file, as main.py does.

With --checkpoint-dir DIR --epochs N it also trains "epochs" as main.py does: it appends a
made-up record per epoch to DIR/metrics.jsonl (main.py's format), keeping the records already
there (a resumed trial, or an ASHA promotion that starts in a copy of its parent's folder),
and reports 1 - the last epoch's validation accuracy.

With --break-above LR it fails (exit 1, a broken trial) when --learning-rate is above LR.

With --record FILE it appends one JSON line to FILE per run, once the objective is written:
{"trial": $ORION_TRIAL_ID, "pid": the worker's pid (os.getppid(): Oríon's singleexecutor
starts the trial from the worker process itself), "host", "start", "end" (time.time() at the
script's start and end)}, in a single write to a file opened with O_APPEND, so that the lines
of concurrent runs never interleave (benchmarks/db_stress.py counts the runs of each trial).
"""

import argparse
import importlib.util
import json
import math
import os
import socket
import time
from pathlib import Path

started = time.time()
# main.py's check that no other worker has taken this trial over (trial_support/reservation.py),
# loaded on its own: trial_support's package imports torch.
_spec = importlib.util.spec_from_file_location(
    "reservation", Path(__file__).resolve().parents[1] / "trial_support" / "reservation.py")
reservation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reservation)

parser = argparse.ArgumentParser()
parser.add_argument("--learning-rate", type=float, required=True)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--checkpoint-dir", type=Path)
parser.add_argument("--epochs", type=int)
parser.add_argument("--record", type=Path, help="append one JSON line per run to this file (see above)")
parser.add_argument("--break-above", type=float, help="fail (exit 1: a broken trial) above this learning rate")
args = parser.parse_args()
time.sleep(args.sleep)
if args.break_above is not None and args.learning_rate > args.break_above:
    raise SystemExit(f"error: learning rate {args.learning_rate} above --break-above {args.break_above}")
distance = abs(math.log10(args.learning_rate) + 3)  # Best at 1e-3.
objective = distance


def val_accuracy(epoch: int) -> float:
    """Rises with the epochs, highest at a learning rate of 1e-3."""
    return max(0.1, 0.9 - 0.15 * distance) * (1 - 0.5 / (epoch + 1))


if args.checkpoint_dir is not None and args.epochs is not None:
    path = args.checkpoint_dir / "metrics.jsonl"
    history = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for epoch in range(len(history), args.epochs):
        history.append({
            "epoch": epoch, "train_loss": 2.0 / (epoch + 1), "val_loss": 2.2 / (epoch + 1),
            "val_accuracy": val_accuracy(epoch), "objective": 1 - val_accuracy(epoch), "untrained_objective": 0.9,
            "train_seconds": 1.5, "val_seconds": 0.25, "examples_per_second": 1000.0, "device": "cpu",
            "end_time": time.time(),
        })
    reservation.exit_if_taken_over("saving a checkpoint")
    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in history))
    objective = history[args.epochs - 1]["objective"]
reservation.write_results([{"name": "objective", "type": "objective", "value": objective}])
print(f"Objective (1 - validation accuracy): {objective:.4f}")
if args.record is not None:
    record = {"trial": os.environ.get("ORION_TRIAL_ID"), "pid": os.getppid(), "host": socket.gethostname(),
              "start": started, "end": time.time()}
    fd = os.open(args.record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())  # One write: concurrent lines don't interleave.
    finally:
        os.close(fd)
