"""`hunt`: Oríon's `orion hunt`, with this project's replacements installed (patches.py), an
exact budget, and one line for every way a worker stops.
"""

import logging
import sys
from pathlib import Path


import orion.core
import orion.core.cli.hunt
from orion.core.cli.base import OrionArgsParser
from orion.core.utils.exceptions import LazyWorkers

from . import patches, records
from .budget import idle_verdict
from .database import DATABASE_LOCK_LEASE, DatabaseLockError
from .heartbeat import MIN_HEARTBEAT, WORKER_STOPPED, stop_worker
from .records import keep_trial_tracebacks_in_the_workers_log

def hunt(hunt_arguments: list[str]) -> int:
    """`orion hunt ARGUMENTS...` that runs exactly max_trials trials, whatever the number of workers.

    A worker with nothing left to run exits 0 at once. `--worker-records DIR` first: where it
    records the trials it runs.
    """
    if hunt_arguments[:1] == ["--worker-records"]:
        records.WORKER_RECORDS, hunt_arguments = Path(hunt_arguments[1]), hunt_arguments[2:]
        records.WORKER_RECORDS.mkdir(parents=True, exist_ok=True)
    patches.install(patches.WORKER)  # What each replacement prevents: docs/orion-patches.md.
    # Not a replacement: Oríon's runner logs a broken trial's traceback; it goes to the worker's log.
    logging.getLogger("orion.client.runner").addFilter(keep_trial_tracebacks_in_the_workers_log)
    if orion.core.config.worker.heartbeat < MIN_HEARTBEAT:
        print(f"error: ORION_HEARTBEAT={orion.core.config.worker.heartbeat} s is too short: a heartbeat must be able "
              f"to wait out the database lock's lease ({DATABASE_LOCK_LEASE:.0f} s, orion_tools); use at least "
              f"{MIN_HEARTBEAT}, e.g. job.sh's default, 30", file=sys.stderr, flush=True)
        return 1
    # Oríon's own `orion.core.cli.main` builds the parser of every subcommand, and one of them
    # imports torch (3.8 s and ~400 MiB per worker; see `main`): only hunt's parser here.
    parser = OrionArgsParser()
    orion.core.cli.hunt.add_subparser(parser.get_subparsers())
    try:
        status = parser.execute(["hunt", *hunt_arguments]) or 0
    except DatabaseLockError as error:
        stop_worker(str(error))
    except LazyWorkers:
        return idle_verdict()
    except BaseException:
        if not WORKER_STOPPED.is_set():
            raise
        # Oríon's runner, while it stops, may trip on what made us stop: said already.
    return 1 if WORKER_STOPPED.is_set() else status


