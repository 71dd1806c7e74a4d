"""The algorithm lock (Oríon's `locked` flag in the algorithm's document): taken over from a
holder silent for ALGORITHM_LOCK_STALE, its release fenced; and the algorithm state's copies, by a
pickle round trip.
"""

import contextlib
import datetime
import os
import pickle
import sys
import time


from orion.storage.base import LockedAlgorithmState, get_uid

from .budget import TERM_PENDING, ObserveLater
from .database import LOCK_WAIT, DatabaseLockError, DatabaseLockLost, trace_lock

# --- The algorithm lock ------------------------------------------------------------------------
# Oríon's algorithm lock is a flag, `locked`, in the experiment's algo document: a worker sets
# it (with `heartbeat`: its clock) to suggest or observe, and clears it, saving the algorithm's
# state, when done. Nothing expires it: a worker killed while holding it (SIGKILL on preemption,
# a node failure) stopped the search for good: the others waited 60 s, then died of
# LockAcquisitionTimeout or idled into LazyWorkers, and job.sh reported success. Here
# (`algorithm_lock`): a waiting worker that sees the same holder (the same `heartbeat` value)
# for ALGORITHM_LOCK_STALE seconds by its own clock takes the lock over, in one atomic update
# that names that value (two waiters cannot both take it). The longest normal hold measured is
# 9.6 s (TPE, 5,000 trials). A holder that was only stalled, once resumed, finds the lock
# no longer its own when it releases it: it saves nothing and stops with one line
# (DatabaseLockLost). If the wait runs out anyway (ALGORITHM_LOCK_TIMEOUT), the worker stops
# with one line that names `orion db release`. ORION_TOOLS_ALGORITHM_LOCK_STALE: for the tests.
ALGORITHM_LOCK_STALE = float(os.environ.get("ORION_TOOLS_ALGORITHM_LOCK_STALE", 120))  # s


# The algorithm lock serializes the search: while one worker holds it, no other suggests or
# observes. With TPE it was held 1.0 s per suggestion at 500 trials and 3.4 s at 2,000 (observe
# about half), most of it in `copy.deepcopy` of every trial the algorithm has seen, two or three
# times per layer, in Oríon's state round trip (its algorithm wrappers and registry copy what the
# layer below has just copied). The state is pickled into the database at the end of each hold
# anyway, so it is all picklable: a pickle round trip makes the same deep copy (same values, same
# sharing inside one copy) several times faster. benchmarks/tpe_lock.py measures the holds by
# experiment size, with Oríon's copies and with these; tests/test_orion_tools checks that a
# TPE search suggests exactly the same trials either way.
def pickled_copy(value):
    """`copy.deepcopy` of a picklable value, by a pickle round trip."""
    return pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))


class AlgorithmRecordMissing(DatabaseLockError):
    """The experiment has no algorithm document at all: one line saying so (not "release the lock")."""


class AlgorithmLockTimeout(DatabaseLockError):
    """The algorithm lock stayed taken for ALGORITHM_LOCK_TIMEOUT: one line, naming `orion db release`."""


@contextlib.contextmanager
def algorithm_lock(self, experiment=None, uid=None, timeout=60, retry_interval=1):
    """Oríon's `Legacy.acquire_algorithm_lock`, which takes over a stale lock and fences its release."""
    uid = get_uid(experiment, uid)
    name = getattr(experiment, "name", uid)
    asked = time.monotonic()
    deadline = asked + timeout
    seen = None  # (the holder's heartbeat, when first seen)
    missing = 0  # Consecutive looks that found no algorithm record at all.
    while True:
        mine = datetime.datetime.utcnow()
        document = self._db.read_and_write("algo", query=dict(experiment=uid, locked=0),
                                           data=dict(locked=1, heartbeat=mine))
        if document is not None:
            break
        [current] = self._db.read("algo", {"experiment": uid}) or [None]
        now = time.monotonic()
        missing = missing + 1 if current is None else 0
        if missing >= 2:  # Not a lock held by someone: nothing to wait for, nothing to release.
            raise AlgorithmRecordMissing(
                f"experiment {name} has no algorithm record in {self._db.host} (the database was damaged or edited): "
                f"restore its last good copy (job.sh's check-database keeps {self._db.host}.bak), or start a new "
                "search with export ORION_EXPERIMENT=<a new name>")
        if current is None or current.get("locked") != 1:
            seen = None
        elif seen is None or seen[0] != current.get("heartbeat"):
            seen = (current.get("heartbeat"), now)
        elif now - seen[1] >= ALGORITHM_LOCK_STALE:
            document = self._db.read_and_write(
                "algo", query=dict(experiment=uid, locked=1, heartbeat=seen[0]), data=dict(locked=1, heartbeat=mine))
            if document is not None:
                print(f"warning: took over the algorithm lock of experiment {name}, taken at {seen[0]} UTC and "
                      f"unchanged for {now - seen[1]:.0f} s (its worker died?)", file=sys.stderr, flush=True)
                break
        if TERM_PENDING.is_set() and getattr(LOCK_WAIT, "unless_signalled", False):
            raise ObserveLater()
        if now >= deadline:
            raise AlgorithmLockTimeout(
                f"the algorithm lock of experiment {name} stayed taken for {timeout:.0f} s: if no worker of it "
                f"runs, release it with: ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS={self._db.host} "
                f"uv run orion db release {name}")
        time.sleep(retry_interval)
    taken = time.monotonic()
    locked = LockedAlgorithmState(
        state=pickle.loads(document["state"]) if document["state"] is not None else None,
        configuration=document["configuration"], locked=True)
    try:
        yield locked
    except BaseException:
        locked.reset()
        raise
    finally:
        new_data = dict(experiment=uid, locked=0, heartbeat=datetime.datetime.utcnow())
        if locked.state is not None:
            new_data["state"] = pickle.dumps(locked.state)
        # Only if it is still ours: a lock taken over meanwhile keeps its new holder's state.
        released = self._db.read_and_write("algo", query=dict(experiment=uid, locked=1, heartbeat=mine),
                                           data=new_data)
        trace_lock("algorithm", taken - asked, time.monotonic() - taken)
        if released is None:
            raise DatabaseLockLost(
                f"this worker held the algorithm lock of experiment {name} so long (stalled?) that another took "
                f"it over: it saved nothing and stops; the other workers go on")


