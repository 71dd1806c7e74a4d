"""The algorithm lock (Oríon's `locked` flag in the algorithm's document): renewed while held,
taken over from a holder silent for ALGORITHM_LOCK_STALE, what is done under it fenced; and the
algorithm state's copies, by a pickle round trip.
"""

import contextlib
import datetime
import os
import pickle
import sys
import threading
import time


from orion.client.runner import Protected
from orion.storage.base import LockedAlgorithmState, get_uid

from .database import LOCK_WAIT, DatabaseLockError, clock, patiently, trace_lock
from .lost_trials import database_writable

# --- The algorithm lock ------------------------------------------------------------------------
# Oríon's algorithm lock is a flag, `locked`, in the experiment's algo document: a worker sets
# it (with `heartbeat`: its clock) to suggest or observe, and clears it, saving the algorithm's
# state, when done. Nothing expires it: a worker killed while holding it (SIGKILL on preemption,
# a node failure) stopped the search for good. Here (`algorithm_lock`):
# - A holder renews its `heartbeat` every ALGORITHM_LOCK_STALE / 10 s while it holds the lock
#   (a thread), so a live holder keeps it however long its suggestion takes.
# - A waiting worker that has watched the same `heartbeat` for ALGORITHM_LOCK_STALE seconds of its
#   own clock takes the lock over, in one atomic update that names that value (two waiters cannot
#   both take it). As for lost trials (lost_trials.py), only watching counts through which the
#   holder could have renewed: looks no more than ALGORITHM_LOCK_STALE / 4 apart that found the
#   database's filesystem writable; a longer gap (the database locked, this worker stalled) or a
#   full or read-only filesystem starts the watch over.
# - What a holder does under the lock counts only while the lock is still its own: the trials it
#   suggests are registered in one database update that checks the lock's `heartbeat` and the
#   budget (`register_within_budget`), and its state is saved only if the lock is still its own.
#   A holder stalled past a takeover (any length) registers nothing and saves nothing: its
#   `produce` produced nothing, its `observe` is done again (AlgorithmLockLost).
# If the wait runs out anyway (ALGORITHM_LOCK_TIMEOUT), the worker stops with one line that names
# `orion db release`. ORION_TOOLS_ALGORITHM_LOCK_STALE: for the tests.
ALGORITHM_LOCK_STALE = float(os.environ.get("ORION_TOOLS_ALGORITHM_LOCK_STALE", 120))  # s

# After each trial, a worker waits for the algorithm's lock (a flag in the database, polled every
# second) to show the result to the algorithm: Oríon waits at most 60 s, hard-coded; with 50
# workers or more on one PickledDB the wait can be longer, and the worker died of
# LockAcquisitionTimeout (benchmarks/db_stress.py; docs/many-workers.md).
ALGORITHM_LOCK_TIMEOUT = 600  # s


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


# Oríon shows a result to the algorithm inside a block that holds back SIGTERM (the runner's
# `Protected`): a worker that Slurm signals while it waits for the algorithm lock (up to
# ALGORITHM_LOCK_TIMEOUT) stayed deaf to it, past job.sh's 120 s before the time limit. Once a
# SIGTERM is pending, the wait ends: the result is in the database already (the trial is
# `completed`), and the next `produce`, by any worker, shows it to the algorithm.
TERM_PENDING = threading.Event()
ORIONS_PROTECTED_HANDLER = Protected.handler


def note_signal(self, sig, frame) -> None:
    """Oríon's `Protected.handler` (a SIGINT or SIGTERM held back), which also tells `algorithm_lock`."""
    TERM_PENDING.set()
    ORIONS_PROTECTED_HANDLER(self, sig, frame)


class ObserveLater(Exception):
    """The wait for the algorithm lock was cut short by a pending SIGTERM (`observe_patiently`)."""


class AlgorithmRecordMissing(DatabaseLockError):
    """The experiment has no algorithm document at all: one line saying so (not "release the lock")."""


class AlgorithmLockTimeout(DatabaseLockError):
    """The algorithm lock stayed taken for ALGORITHM_LOCK_TIMEOUT: one line, naming `orion db release`."""


class AlgorithmLockLost(Exception):
    """This worker's hold of the algorithm lock was taken over (it was stalled): nothing it did counts."""


class Hold:
    """One hold of the algorithm lock: its current `heartbeat`, renewed by a thread until released."""

    def __init__(self, database, uid, heartbeat):
        self.database, self.uid, self.heartbeat = database, uid, heartbeat
        self.mutex = threading.Lock()  # A renewal and the release never interleave.
        self.released = threading.Event()
        self.renewer = threading.Thread(target=self.renew, daemon=True, name="orion-tools-algorithm-lock")
        self.renewer.start()

    def query(self) -> dict:
        return dict(experiment=self.uid, locked=1, heartbeat=self.heartbeat)

    def renew(self) -> None:
        while not self.released.wait(ALGORITHM_LOCK_STALE / 10):
            with self.mutex:
                if self.released.is_set():
                    return
                renewed = datetime.datetime.utcnow()
                if self.database.read_and_write("algo", query=self.query(), data=dict(heartbeat=renewed)) is None:
                    return  # Taken over: the release says so.
                self.heartbeat = renewed

    def release(self, data: dict) -> bool:
        """Saves `data` and clears the lock, if it is still this hold's."""
        with self.mutex:
            self.released.set()
            return self.database.read_and_write("algo", query=self.query(), data=data) is not None


HOLDING = threading.local()  # .hold: this thread's Hold while it holds the lock.


def register_within_budget(experiment, trials: list) -> int:
    """Registers the suggested `trials` (Oríon's `Experiment.register_trial`), as many as the budget
    has left, in one database update that first checks that this thread still holds the algorithm
    lock; AlgorithmLockLost if not. Returns how many were registered (duplicates are skipped)."""
    hold = HOLDING.hold
    configs = []
    for trial in trials:
        trial.experiment = experiment.id
        trial.status = "new"
        trial.submit_time = datetime.datetime.utcnow()
        trial.exp_working_dir = experiment.working_dir
        configs.append((trial, trial.to_dict()))

    def register(database) -> int:
        if not database.read("algo", hold.query()):
            raise AlgorithmLockLost()
        present = database.read("trials", {"experiment": experiment.id}, selection={"id": 1, "status": 1})
        left = experiment.max_trials - sum(doc["status"] != "broken" for doc in present)
        known = {doc["id"] for doc in present}
        registered = 0
        for trial, config in configs:
            if registered >= left or config["id"] in known:
                continue
            config = dict(config)
            database.write("trials", config)
            trial.id_override = config["_id"]
            registered += 1
        return registered

    @patiently
    def register_in_one_update(db) -> int:
        with db.locked_database(write=True) as database:
            return register(database)
    db = experiment._storage._db
    # A PickledDB file: one locked update. Oríon's in-memory database (its tests, --debug): as it is.
    return register_in_one_update(db) if hasattr(db, "locked_database") else register(db)


@contextlib.contextmanager
def algorithm_lock(self, experiment=None, uid=None, timeout=60, retry_interval=1):
    """Oríon's `Legacy.acquire_algorithm_lock`, renewed while held, taken over from a stalled or dead
    holder, and fenced (above)."""
    uid = get_uid(experiment, uid)
    name = getattr(experiment, "name", uid)
    asked = time.monotonic()
    deadline = asked + timeout
    seen = None  # (the holder's heartbeat, clock() when first seen)
    last_look = None  # clock() of the last look that counted
    missing = 0  # Consecutive looks that found no algorithm record at all.
    while True:
        mine = datetime.datetime.utcnow()
        document = self._db.read_and_write("algo", query=dict(experiment=uid, locked=0),
                                           data=dict(locked=1, heartbeat=mine))
        if document is not None:
            break
        [current] = self._db.read("algo", {"experiment": uid}) or [None]
        now = clock()
        missing = missing + 1 if current is None else 0
        if missing >= 2:  # Not a lock held by someone: nothing to wait for, nothing to release.
            raise AlgorithmRecordMissing(
                f"experiment {name} has no algorithm record in {self._db.host} (the database was damaged or edited): "
                f"restore its last good copy (job.sh's check-database keeps {self._db.host}.bak), or start a new "
                "search with export ORION_EXPERIMENT=<a new name>")
        counted = (last_look is not None and now - last_look <= max(ALGORITHM_LOCK_STALE / 4, 3 * retry_interval)
                   and database_writable(self._db.host))
        last_look = now
        if current is None or current.get("locked") != 1 or not counted:
            seen = None
        elif seen is None or seen[0] != current.get("heartbeat"):
            seen = (current.get("heartbeat"), now)
        elif now - seen[1] >= ALGORITHM_LOCK_STALE:
            document = self._db.read_and_write(
                "algo", query=dict(experiment=uid, locked=1, heartbeat=seen[0]), data=dict(locked=1, heartbeat=mine))
            if document is not None:
                print(f"warning: took over the algorithm lock of experiment {name}, taken at {seen[0]} UTC and "
                      f"not renewed for {now - seen[1]:.0f} s (its worker died or is stalled)", file=sys.stderr, flush=True)
                break
        if TERM_PENDING.is_set() and getattr(LOCK_WAIT, "unless_signalled", False):
            raise ObserveLater()
        if time.monotonic() >= deadline:
            raise AlgorithmLockTimeout(
                f"the algorithm lock of experiment {name} stayed taken for {timeout:.0f} s: if no worker of it "
                f"runs, release it with: ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS={self._db.host} "
                f"uv run orion db release {name}")
        time.sleep(retry_interval)
    taken = time.monotonic()
    hold = HOLDING.hold = Hold(self._db, uid, mine)
    locked = LockedAlgorithmState(
        state=pickle.loads(document["state"]) if document["state"] is not None else None,
        configuration=document["configuration"], locked=True)
    try:
        yield locked
    except BaseException:
        locked.reset()
        raise
    finally:
        HOLDING.hold = None
        new_data = dict(experiment=uid, locked=0, heartbeat=datetime.datetime.utcnow())
        if locked.state is not None:
            new_data["state"] = pickle.dumps(locked.state)
        # Only if it is still ours: a lock taken over meanwhile keeps its new holder's state.
        released = hold.release(new_data)
        trace_lock("algorithm", taken - asked, time.monotonic() - taken)
        if not released:
            raise AlgorithmLockLost(
                f"this worker held the algorithm lock of experiment {name} so long (stalled?) that another took "
                "it over: what it did under the lock is not saved")
