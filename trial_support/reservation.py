"""Whether this trial's process still runs for the worker that holds the trial's reservation.

A worker stalled for long (suspended, a file server stall) while its trial's process runs on, on
local disk, has its trial taken for lost by the other workers, and another worker runs it again,
in the same folder, resuming from its checkpoint. The first process must then neither write a
checkpoint into that folder nor report an objective: it would overwrite the new run's files, or
finish the trial a second time. `orion_tools hunt` gives the trial's process its reservation
(ORION_TOOLS_RESERVED_AT) and writes the reservation of the worker that runs the trial now into
the trial's folder (worker.json); the two are compared before each checkpoint and before the
report. Standard library only: tests/standin_trial.py loads this file on its own.
"""

import json
import os
import sys
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
