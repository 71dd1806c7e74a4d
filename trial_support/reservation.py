"""The trial's side of the worker's protocol: whether this process still runs for the worker that
holds the trial's reservation, and the result written where Oríon reads it, waiting out a full disk.

A worker stalled for long (suspended, a file server stall) while its trial's process runs on, on
local disk, has its trial taken for lost by the other workers, and another worker runs it again,
in the same folder, resuming from its checkpoint. The first process must then neither write a
checkpoint into that folder nor report an objective: it would overwrite the new run's files, or
finish the trial a second time. `orion_tools hunt` gives the trial's process its reservation
(ORION_TOOLS_RESERVED_AT) and writes the reservation of the worker that runs the trial now into
the trial's folder (worker.json); the two are compared before each checkpoint and before the
report. Standard library only: tests/standin_trial.py loads this file on its own.
"""

import errno
import json
import os
import sys
import time
from pathlib import Path

TAKEN_OVER_EXIT_CODE = 130  # Oríon's "interrupted": the trial is not counted as broken.


def still_reserved_here() -> bool:
    """False once another worker has started running this trial (see above)."""
    reserved_at, folder = os.environ.get("ORION_TOOLS_RESERVED_AT"), os.environ.get("ORION_WORKING_DIR")
    if not reserved_at or not folder:  # Not started by orion_tools hunt: by hand, or a test.
        return True
    try:
        worker = json.loads((Path(folder) / "worker.json").read_text())
    except (OSError, ValueError):  # Unreadable for a moment: the worker's own checks decide.
        return True
    return not isinstance(worker, dict) or worker.get("reserved_at") in (None, reserved_at)


def exit_if_taken_over(before: str) -> None:
    """Exits (130) with one line if another worker runs this trial now, before `before`."""
    if not still_reserved_here():
        print(f"error: another worker took this trial over while it ran here (its worker stalled?): it stops before "
              f"{before}; the other worker's run counts", file=sys.stderr, flush=True)
        sys.exit(TAKEN_OVER_EXIT_CODE)


# A full, over-quota or read-only $SCRATCH for a while: the result of a run that reached its end
# is worth waiting for (the worker waits too, and the database with it), not a broken trial.
OUTAGES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ESTALE, errno.EIO}


def write_results(results: list) -> None:
    """Writes `results` ([{"name", "type", "value"}], Oríon's results protocol) to $ORION_RESULTS_PATH,
    unless another worker took this trial over; a full or read-only filesystem is waited out."""
    exit_if_taken_over("reporting its objective")
    path, waited = os.environ.get("ORION_RESULTS_PATH"), None
    while path:
        try:
            with open(path, "w") as file:
                json.dump(results, file)
            break
        except OSError as error:
            if error.errno not in OUTAGES:
                raise
            if waited is None:
                waited = time.monotonic()
                print(f"warning: cannot write the result to {path} ({os.strerror(error.errno)}): waiting until it can "
                      "be written; nothing is lost meanwhile", file=sys.stderr, flush=True)
            time.sleep(2)
    if waited is not None:
        print(f"The result is written, after {time.monotonic() - waited:.0f} s", file=sys.stderr, flush=True)
