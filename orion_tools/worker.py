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
from .algorithm_lock import ALGORITHM_LOCK_STALE
from .budget import idle_verdict
from .database import DATABASE_LOCK_LEASE, PATIENT, DatabaseLockError, patiently, storage
from .heartbeat import WORKER_STOPPED, stop_worker
from .records import keep_trial_tracebacks_in_the_workers_log

# --- Timings every worker of a database must share -----------------------------------------------
# A worker takes a trial for lost after 5 x ITS OWN ORION_HEARTBEAT: a job started with 120 s
# beside one with 23 s saw its live trials taken for lost and run twice. The database lock's
# lease and the algorithm lock's takeover are judged the same way. So the first worker of a
# database records them in it (collection `orion_tools_settings`), and a worker with other values
# is refused in one line while any trial of the database is reserved; once none is, the new
# values replace the old ones (a new search may choose others).
SETTINGS = "orion_tools_settings"


def timings() -> dict:
    return {"ORION_HEARTBEAT": orion.core.config.worker.heartbeat, "ORION_TOOLS_LOCK_LEASE": DATABASE_LOCK_LEASE,
            "ORION_TOOLS_ALGORITHM_LOCK_STALE": ALGORITHM_LOCK_STALE}


def agree_on_timings(database_path: str) -> str | None:
    """Records this worker's timings in the database, or says in one line why they are refused."""
    from orion.core.io.database.pickleddb import PickledDB
    config = storage(database_path)["database"]
    db = PickledDB(host=config["host"], timeout=config["timeout"])
    mine = timings()

    @patiently
    def agree(db):
        with db.locked_database(write=True) as database:
            [recorded] = database.read(SETTINGS, {"_id": "timings"}) or [None]
            recorded = {key: value for key, value in (recorded or {}).items() if key != "_id"}
            if recorded == mine:
                return None
            if recorded and database.count("trials", {"status": "reserved"}):
                differ = ", ".join(f"{key}={recorded[key]:g} there, {value:g} here" for key, value in mine.items()
                                   if recorded.get(key) != value)
                return (f"the workers running on {database_path} use other timings ({differ}): every worker of one "
                        "database must use the same, or live trials are taken for lost; use theirs, or another "
                        "database (ORION_DB_ADDRESS)")
            database.remove(SETTINGS, {"_id": "timings"})
            database.write(SETTINGS, {"_id": "timings", **mine})
            return None
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
    database = orion.core.config.storage.database
    refused = agree_on_timings(database.host) if database.type == "pickleddb" and database.host else None
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


