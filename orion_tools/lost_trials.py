"""When a reserved trial counts as lost (its worker died or is stalled), judged so that no fault
of the database, and no stall of the judge, makes a live trial look lost.
"""

import datetime
import os
import threading

import orion.core
from orion.storage.base import FailedUpdate

from .database import clock

# --- A trial is lost when its heartbeat has stood still while it could have moved ----------------
# Oríon marks `interrupted` (to be run again) every reserved trial whose heartbeat is older than
# 5 x ORION_HEARTBEAT by the judging worker's clock (`fix_lost_trials`, before each reservation).
# That takes a live trial for lost whenever its heartbeat could not be written for that long
# through no fault of its own: a database lock left by a dead worker or held by a stalled one, a
# full or read-only filesystem, the judge's own stall, or the judge's clock ahead of the trial's
# node. Here (`fix_lost_trials`) a worker judges only what it has watched itself: a trial is lost
# once this worker has seen its heartbeat (and reservation) unchanged for 5 x ORION_HEARTBEAT of
# its own clock, through looks at the database no more than ORION_HEARTBEAT apart, each of which
# found the database's filesystem writable. A gap longer than that (the database was locked, this
# worker was stalled or busy) or a filesystem that cannot be written starts the watch over. So a
# trial is taken for lost only after 5 heartbeats' time during which its worker could have
# written one every ORION_HEARTBEAT and did not: however long the database or the judge was
# stopped. And it is marked only if its heartbeat is still the one watched (one atomic update),
# so a heartbeat written at the last moment wins. A worker taken for lost although alive (it was
# stalled past that) cannot write into the next reservation (heartbeat.py), and stops.
WATCHED: dict = {}  # trial id -> ((heartbeat, start_time), clock() when first seen so)
LAST_SEEN: dict = {}  # trial id -> (heartbeat, start_time) at this worker's last look, any look
ALIVE: set = set()  # Trials whose heartbeat this worker has seen move: their worker lives.
ANNOUNCED: set = set()  # Trials this worker has said it watches.
LAST_LOOK: list = [None]  # clock() of this worker's last look that counted
WATCH_LOCK = threading.Lock()


def database_writable(path: str | None) -> bool:
    """Whether the database's filesystem is writable now (not read-only, not full). A database
    that is no file (Oríon's in-memory EphemeralDB, MongoDB) is taken as writable."""
    if not path:
        return True
    try:
        stat = os.statvfs(os.path.dirname(os.path.abspath(path)))
        size = os.path.getsize(path)
    except OSError:
        return False
    # Room for the temporary copy that every write makes, and some.
    return not stat.f_flag & os.ST_RDONLY and stat.f_bavail * stat.f_frsize > 2 * size + 2**20


def watch(trials: list, database: str) -> None:
    """Notes what this look at the database showed of the reserved trials (see above)."""
    interval = orion.core.config.worker.heartbeat
    now = clock()
    with WATCH_LOCK:
        counted = database_writable(database)
        if not counted or LAST_LOOK[0] is None or now - LAST_LOOK[0] > interval:
            WATCHED.clear()
        LAST_LOOK[0] = now if counted else None
        seen = {}
        for trial in trials:
            if trial.status != "reserved":
                continue
            state = (trial.heartbeat, trial.start_time)
            if LAST_SEEN.get(trial.id, state) != state:
                ALIVE.add((trial.id, trial.start_time))
            LAST_SEEN[trial.id] = state
            before = WATCHED.get(trial.id)
            seen[trial.id] = before if before is not None and before[0] == state else (state, now)
        WATCHED.clear()
        WATCHED.update(seen)


def looks_lost(trial) -> bool:
    """Whether this worker has watched the reserved `trial` stand still for 5 x ORION_HEARTBEAT."""
    with WATCH_LOCK:
        watched = WATCHED.get(trial.id)
        return (trial.status == "reserved" and watched is not None and watched[0] == (trial.heartbeat, trial.start_time)
                and clock() - watched[1] >= 5 * orion.core.config.worker.heartbeat)


def seen_alive(trial) -> bool:
    """Whether this worker has seen the heartbeat of `trial`'s current reservation move."""
    with WATCH_LOCK:
        return (trial.id, trial.start_time) in ALIVE


def may_be_lost(trial) -> bool:
    """Whether a worker should stay for `trial` (it may become lost, to be run again): it looks
    lost, or its heartbeat is older than 5 x ORION_HEARTBEAT by this worker's clock. The latter
    alone never marks it lost (a clock ahead, an outage): it only keeps a worker watching, so that
    a job resubmitted after all its workers died finishes the trials they left."""
    if trial.status != "reserved":
        return False
    stale = datetime.datetime.utcnow() - datetime.timedelta(seconds=5 * orion.core.config.worker.heartbeat)
    return looks_lost(trial) or (trial.heartbeat is not None and trial.heartbeat <= stale)


def fix_lost_trials(self, with_evc_tree=True) -> None:
    """Oríon's `Experiment.fix_lost_trials`, judging as described above."""
    self._check_if_writable()
    reserved = self._storage.fetch_trials_by_status(self, "reserved")
    watch(reserved, getattr(self._storage._db, "host", None))
    for trial in reserved:
        if may_be_lost(trial) and (trial.id, trial.start_time) not in ANNOUNCED:
            ANNOUNCED.add((trial.id, trial.start_time))
            print(f"Trial {trial.id} is reserved but its heartbeat is old (its worker died, or is stalled?): this "
                  f"worker runs it again once it has watched it stand still for 5 x ORION_HEARTBEAT = "
                  f"{5 * orion.core.config.worker.heartbeat} s", flush=True)
        if not looks_lost(trial):
            continue
        where = {"status": "reserved", "heartbeat": trial.heartbeat, "start_time": trial.start_time}
        try:
            marked = self._storage.update_trial(trial, status="interrupted", heartbeat=datetime.datetime.utcnow(),
                                                where=where)
        except FailedUpdate:
            marked = 0
        if marked:
            print(f"Trial {trial.id} counts as lost (its heartbeat stood still for 5 x ORION_HEARTBEAT = "
                  f"{5 * orion.core.config.worker.heartbeat} s while the database was usable): it runs again",
                  flush=True)
