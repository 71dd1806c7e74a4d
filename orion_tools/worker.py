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
from .database import DATABASE_LOCK_LEASE, PATIENT, DatabaseLockError, patiently, storage
from .heartbeat import WORKER_STOPPED, stop_worker
from .records import keep_trial_tracebacks_in_the_workers_log

# --- Timings every worker of a search must share ---------------------------------------------------
# A worker takes a trial for lost after 5 x ITS OWN ORION_HEARTBEAT: a job started with 120 s
# beside one with 23 s saw its live trials taken for lost and run twice; and the database lock's
# lease is its file's. So the first worker of an experiment records them in the database
# (collection `orion_tools_settings`, in the same update that reads them: two workers starting at
# once cannot both be first), and a worker of that experiment with other values is refused in one
# line. A new experiment may choose others.
SETTINGS = "orion_tools_settings"
LONGEST_HEARTBEAT = 86400  # s: beyond, Python's timers overflow (and a lost trial would wait 5 days).


def timings() -> dict:
    # (Not ALGORITHM_LOCK_STALE: a waiter more impatient than the holder's renewals takes a live
    # holder's lock over, which is wasteful but safe: what the old holder then does is fenced.)
    return {"ORION_HEARTBEAT": orion.core.config.worker.heartbeat, "ORION_TOOLS_LOCK_LEASE": DATABASE_LOCK_LEASE}


def experiment_name(hunt_arguments: list[str]) -> str | None:
    for i, argument in enumerate(hunt_arguments):
        if argument in ("-n", "--name") and i + 1 < len(hunt_arguments):
            return hunt_arguments[i + 1]
        if argument.startswith("--name="):
            return argument.split("=", 1)[1]
    return None


def agree_on_timings(database_path: str, experiment: str) -> str | None:
    """Records this worker's timings for `experiment` in the database, or says in one line why
    they are refused."""
    from orion.core.io.database.pickleddb import PickledDB
    config = storage(database_path)["database"]
    db = PickledDB(host=config["host"], timeout=config["timeout"])
    mine = timings()
    key = f"timings of {experiment}"

    @patiently
    def agree(db):
        with db.locked_database(write=True) as database:
            [recorded] = database.read(SETTINGS, {"_id": key}) or [None]
            if recorded is None:
                database.write(SETTINGS, {"_id": key, **mine})
                return None
            recorded = {name: value for name, value in recorded.items() if name != "_id"}
            if recorded == mine:
                return None
            differ = ", ".join(f"{name}={recorded.get(name)} there, {value} here" for name, value in mine.items()
                               if recorded.get(name) != value)
            return (f"experiment {experiment}'s workers use other timings ({differ}; set by its first worker): every "
                    "worker of one search must use the same, or live trials are taken for lost; use theirs, or a new "
                    "experiment (ORION_EXPERIMENT=<a new name>)")
    return agree(db)


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
    PATIENT.set()  # A worker waits out the database's faults (database.py).
    heartbeat = orion.core.config.worker.heartbeat
    if not 1 <= heartbeat <= LONGEST_HEARTBEAT:
        print(f"error: ORION_HEARTBEAT={heartbeat}: use a number of seconds from 1 to {LONGEST_HEARTBEAT}, e.g. job.sh's "
              "default, 30", file=sys.stderr, flush=True)
        return 1
    database, name = orion.core.config.storage.database, experiment_name(hunt_arguments)
    refused = agree_on_timings(database.host, name) if database.type == "pickleddb" and database.host and name else None
    if refused:
        print(f"error: {refused}", file=sys.stderr, flush=True)
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


