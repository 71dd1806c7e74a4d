"""What job.sh does in Python, beyond `orion hunt` itself: one subcommand per task.

    python orion_tools.py hunt [--worker-records DIR] -n NAME --config FILE ... python main.py ...
                                                  # orion hunt, exact budget; records what it ran
    python orion_tools.py reclaim --experiment NAME --trials-dir DIR --job-id ID --since EPOCH
    python orion_tools.py job-verdict --worker-records DIR --hunt-status N [--experiment NAME]
                                                  # what a job ran, its exit code
    python orion_tools.py stage-data --module cifar10.py --destination DIR   # the data set, on a node
    python orion_tools.py check-database [--experiment NAME]   # refuse an emptied database, back it up
    python orion_tools.py check-experiment --experiment NAME --algorithm YAML -- python main.py ...
                                                  # refuse a bad prior, or a rerun with other settings
    python orion_tools.py summary [--experiment NAME]       # trials by status, best so far: 2 lines
    python orion_tools.py report [--experiment NAME] [--trials-dir DIR] [--output DIR] [--if-done]

The database is the PickledDB file of --database (default: $ORION_DB_ADDRESS, which job.sh
exports). To add a subcommand, write a function `name(args) -> exit code` and its parser
in `parse_args`.
"""

import argparse
import collections
import contextlib
import copy
import datetime
import importlib.util
import io
import json
import logging
import math
import os
import pickle
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import yaml

import orion.algo.base.registry
import orion.core
import orion.core.cli.hunt
import orion.core.worker.algo_wrappers.algo_wrapper
import orion.core.worker.algo_wrappers.insist_suggest
import orion.core.io.database.pickleddb
from filelock import LeaseSettingsMismatch, SoftFileLease, SoftFileLock, Timeout
from orion.algo.hyperband import Hyperband
from orion.client import get_experiment
from orion.core.cli.base import OrionArgsParser
from orion.core.io.database import DatabaseTimeout, DuplicateKeyError
from orion.core.io.database.pickleddb import PickledDB
from orion.core.io.orion_cmdline_parser import OrionCmdlineParser
from orion.core.io.space_builder import SpaceBuilder
from orion.client.runner import Protected
from orion.core.worker.consumer import Consumer, ExecutionError
from orion.core.worker.experiment import Experiment
from orion.core.worker.producer import Producer
from orion.core.worker.trial import Trial
from orion.core.worker.trial_pacemaker import TrialPacemaker
from orion.core.utils.exceptions import InexecutableUserScript, LazyWorkers, NoConfigurationError
from orion.storage.base import FailedUpdate  # Not in orion.core.utils.exceptions.
from orion.storage.base import LockedAlgorithmState, get_uid
from orion.storage.legacy import Legacy

# What a worker writes in a trial's folder when it starts running the trial (`record_worker`).
WORKER_FILE = "worker.json"


# --- The database lock: what every subcommand gets -------------------------------------------
# PickledDB (Oríon's file database) locks its file for each operation, unpickles the whole file,
# changes it and writes it back (a temporary file, then a rename). Where the filesystem has
# flock (ext4, GPFS, Lustre mounted with flock) Oríon takes a kernel lock: no one can take it
# from a live process, and the kernel frees it when its holder dies. Kept as it is. Elsewhere
# (NFS, tmpfs, XFS, Lustre without flock) Oríon uses a marker file, `orion_db.pkl.lock`, which
# filelock judges stale only when its holder is a dead process of this host: a worker SIGKILLed
# on another node stopped every worker, for good. Breaking a marker by its age alone (filelock's
# `lifetime`, what this file did before) admits a second writer while the first is alive but
# stalled (SIGSTOP: Slurm suspend or gang scheduling; an NFS stall; swapping; or a node's clock
# ahead of the file server's): resumed, the first wrote back the copy it had read before its
# stall (completed trials rolled back, then run again), and through PickledDB's shared
# temporary name `orion_db.pkl.tmp` it renamed or tore the other writer's file. So, for a soft
# lock (README, "Many workers on one database"):
# - A lease (filelock's SoftFileLease): the marker carries a unique token, and its holder renews
#   it (touches it) every DATABASE_LOCK_LEASE / 10 s while it holds the lock, so a live holder
#   keeps it however long it holds. Another process takes the marker over once it has seen it
#   unchanged for DATABASE_LOCK_LEASE seconds by its own clock (a clock ahead of the file
#   server's cannot shorten that). A marker of another kind (a plain `orion` command's)
#   unchanged that long is broken too.
# - Fencing: each writer writes its own temporary file (host, pid and thread in its name) and
#   renames it over the database only if, right before the rename, the marker is still its own
#   (the same file) and was renewed less than half a lease ago: a takeover needs a whole lease
#   of silence. Otherwise it deletes its file, writes nothing, and stops with one line
#   (DatabaseLockLost). Left: a stall of half a lease between that check and the rename.
# - The lease, 90 s, is a hundred times the longest normal hold (2-10 ms up to 500 trials,
#   0.2-0.8 s at 5,000 trials): only a stall lasts that long. A holder stalled for more than
#   half of it stops (its job says why); one stalled less goes on. Longer would also tolerate
#   longer stalls, but a marker left by a worker killed on another node stops everyone for a lease.
# Every process on one database must use the same lease (filelock refuses another):
# ORION_TOOLS_LOCK_LEASE, seconds, exists for the tests, which cannot wait 90 s.
DATABASE_LOCK_LEASE = float(os.environ.get("ORION_TOOLS_LOCK_LEASE", 90))  # s
# How long a process waits for the lock before Oríon's DatabaseTimeout. (Oríon's default is 60
# s; job.sh puts this value in the workers' configuration, `storage.database.timeout`.) Above
# the lease, so that a marker left by a killed worker is broken before anyone gives up.
DATABASE_LOCK_TIMEOUT = 120  # s
LOCK_POLL = 1.0  # s between two looks at a marker that filelock does not break.
LOCK_WAIT = threading.local()  # .until: time.monotonic() after which this thread waits no more.

ORIONS_CREATE_LOCK = orion.core.io.database.pickleddb._create_lock  # Before `main` replaces it.
HOST = socket.gethostname()


class DatabaseLockError(BaseException):
    """The database cannot be used safely: one line for the user, and the worker stops.

    A BaseException, as KeyboardInterrupt: Oríon's worker turns an Exception raised while it
    prepares a trial into a broken trial, and goes on; this must stop it.
    """


class DatabaseLockLost(DatabaseLockError):
    """This process's soft lock on the database was taken over while it held it: nothing written."""


def clock() -> float:
    """Seconds, counting a suspended machine's time too (CLOCK_BOOTTIME; time.monotonic() does not)."""
    return time.clock_gettime(getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC))


def identity(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


class RenewedElsewhere(SoftFileLease):
    """filelock's lease without its renewal thread: LeasedLock renews (one thread per process, where
    filelock starts one per hold: 6 ms inside each hold on a loaded node, more than the hold itself)."""

    def _start_heartbeat(self, claim, fd, identity, token) -> None:  # filelock 4.3.1's hook.
        pass


class LeasedLock:
    """The soft lock described above: acquire(timeout), check() before a write, release()."""

    # One thread per process renews every hold of the process.
    _holds: set = set()
    _holds_lock = threading.Lock()
    _renewer: threading.Thread | None = None

    def __init__(self, path: str):
        self.path = path
        self.lease = RenewedElsewhere(path, lease_duration=DATABASE_LOCK_LEASE)
        self.fd = None
        self.marker = None  # identity() of our marker
        self.renewed = 0.0  # clock() before our last successful renewal
        self.mutex = threading.Lock()  # The renewing thread never touches a closed (reused) descriptor.

    def acquire(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        seen = None  # (marker key, when first seen unchanged)
        while True:
            try:
                self.lease.acquire(timeout=max(0.0, min(LOCK_POLL, deadline - time.monotonic())))
                break
            except LeaseSettingsMismatch:
                raise DatabaseLockError(
                    f"another process locks {self.path} with another lease (ORION_TOOLS_LOCK_LEASE): "
                    "every worker of one database must use the same") from None
            except Timeout:
                if time.monotonic() >= deadline:
                    raise
                seen = self._break_if_unchanged(seen)
        try:
            before = clock()
            self.fd = os.open(self.path, os.O_RDONLY)
            content = os.read(self.fd, 4096).decode(errors="replace")
            self.marker = identity(os.fstat(self.fd))
            if self.lease.token not in content or identity(os.lstat(self.path)) != self.marker:
                raise DatabaseLockLost(f"the lock {self.path} was taken over as soon as this process got it")
            os.utime(self.fd)  # Contenders time the lease from this change.
            self.renewed = before
        except BaseException:
            self.release()
            raise
        with LeasedLock._holds_lock:
            LeasedLock._holds.add(self)
            if LeasedLock._renewer is None:
                LeasedLock._renewer = threading.Thread(target=LeasedLock._renew_all, daemon=True,
                                                       name="orion-tools-lease")
                LeasedLock._renewer.start()

    def _break_if_unchanged(self, seen):
        """Breaks a marker unchanged for a lease that filelock keeps (another kind, another host)."""
        try:
            stat = os.lstat(self.path)
        except FileNotFoundError:
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
        now = time.monotonic()
        if seen is None or seen[0] != key:
            return key, now
        if now - seen[1] < DATABASE_LOCK_LEASE + LOCK_POLL:
            return seen
        aside = temporary_path(f"{self.path}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        if os.lstat(aside).st_ino != stat.st_ino:  # Replaced meanwhile by a live holder's: put it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        else:
            print(f"warning: broke the lock {self.path}, unchanged for {now - seen[1]:.0f} s "
                  f"(left by a process that died on another host?)", file=sys.stderr, flush=True)
        os.unlink(aside)
        return None

    @classmethod
    def _renew_all(cls) -> None:
        while True:
            time.sleep(DATABASE_LOCK_LEASE / 10)
            with cls._holds_lock:
                holds = list(cls._holds)
            for hold in holds:
                hold.renew()

    def renew(self) -> None:
        before = clock()
        with self.mutex:
            try:
                if self.fd is not None and identity(os.lstat(self.path)) == self.marker:
                    os.utime(self.fd)
                    self.renewed = before
            except OSError:  # Gone: check() tells.
                pass

    def check(self) -> None:
        """Raises DatabaseLockLost unless this process still holds the lock, for half a lease at least."""
        try:
            ours = identity(os.lstat(self.path)) == self.marker
        except FileNotFoundError:
            ours = False
        silent = clock() - self.renewed
        if not ours or silent >= DATABASE_LOCK_LEASE / 2:
            raise DatabaseLockLost(
                f"this process held the lock of the Oríon database {self.path[:-len('.lock')]} but was stalled "
                f"{silent:.0f} s (suspended? a file server stall?) and "
                + ("another process took the lock over" if not ours else "may have lost it")
                + ": it wrote nothing, and stops; the other workers go on")

    def release(self) -> None:
        with LeasedLock._holds_lock:
            LeasedLock._holds.discard(self)
        with self.mutex:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        self.lease.release()


class KernelLock:
    """Oríon's flock, as it is: check() has nothing to check."""

    def __init__(self, lock):
        self.lock = lock

    def acquire(self, timeout: float) -> None:
        self.lock.acquire(timeout=timeout)

    def check(self) -> None:
        pass

    def release(self) -> None:
        self.lock.release()


def database_lock(path: str):
    """The lock for a database's lock file `path`: Oríon's flock, or a LeasedLock instead of its soft lock."""
    lock = ORIONS_CREATE_LOCK(path)
    return LeasedLock(path) if isinstance(lock, SoftFileLock) else KernelLock(lock)


def temporary_path(path) -> str:
    """A temporary name beside `path`, unique across hosts, processes and threads, and across pid
    namespaces (containers) of one host: the same host name and pid there, so a random part too."""
    return f"{path}.{HOST}.{os.getpid()}.{threading.get_native_id()}.{secrets.token_hex(4)}.tmp"


# ORION_TOOLS_LOCK_TRACE=FILE: each hold of the database lock and of the algorithm lock appends
# one JSON line to FILE (benchmarks/db_stress.py reads them: how long workers wait and hold).
LOCK_TRACE = os.environ.get("ORION_TOOLS_LOCK_TRACE")
TRACE_FAILED = threading.Event()  # Set once the trace could not be written (said once).


def trace_lock(kind: str, waited: float, held: float) -> None:
    if not LOCK_TRACE:
        return
    line = json.dumps({"lock": kind, "pid": os.getpid(), "waited": round(waited, 4), "held": round(held, 4),
                       "end": round(time.time(), 3)}) + "\n"
    try:
        with open(LOCK_TRACE, "a") as file:  # One write to an O_APPEND file: lines never interleave.
            file.write(line)
    except OSError as error:  # The trace is optional: say so once, and go on.
        if not TRACE_FAILED.is_set():
            TRACE_FAILED.set()
            print(f"warning: ORION_TOOLS_LOCK_TRACE={LOCK_TRACE}: cannot append to it ({error.strerror}): "
                  "no lock trace from this worker", file=sys.stderr, flush=True)


@contextlib.contextmanager
def fenced_locked_database(self, write=True):
    """Oríon's `PickledDB.locked_database`, with database_lock() and a fenced write of its own name."""
    lock = database_lock(self.host + ".lock")
    # A heartbeat waits no longer than its deadline (`beat`).
    until = getattr(LOCK_WAIT, "until", None)
    timeout = self.timeout if until is None else max(0.0, min(self.timeout, until - time.monotonic()))
    asked = time.monotonic()
    try:
        lock.acquire(timeout=timeout)
    except Timeout as error:
        # One line, not Oríon's 20 (TIMEOUT_ERROR_MESSAGE).
        raise DatabaseTimeout(f"the Oríon database {self.host} stayed locked for {timeout:.1f} s: too many "
                              "workers on one database, or a stalled file server? (README, \"Many workers on one "
                              "database\")") from error
    taken = time.monotonic()
    try:
        database = self._get_database()
        yield database
        if write:
            temporary = temporary_path(self.host)
            try:
                with open(temporary, "wb") as file:
                    pickle.dump(database, file)
                lock.check()
                os.rename(temporary, self.host)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
    finally:
        lock.release()
        trace_lock("database", taken - asked, time.monotonic() - taken)


def install_database_lock() -> None:
    """Every PickledDB of this process locks and writes as described above."""
    PickledDB.locked_database = fenced_locked_database


def storage(database: str) -> dict:
    """Oríon's storage configuration for a PickledDB file."""
    return {"type": "legacy",
            "database": {"type": "pickleddb", "host": database, "timeout": DATABASE_LOCK_TIMEOUT}}


def worker_of(trial_dir: Path) -> dict:
    """What the worker that last started running the trial wrote of itself ({}: none, or unreadable)."""
    try:
        worker = json.loads((trial_dir / WORKER_FILE).read_text())
    except (OSError, ValueError):  # No file yet, or one cut short by a kill.
        return {}
    return worker if isinstance(worker, dict) else {}


def mark_interrupted(experiment, trial) -> bool:
    """Sets a `reserved` trial to `interrupted`; False if it no longer was reserved."""
    try:
        experiment.storage.set_trial_status(trial, status="interrupted", was="reserved")
    except FailedUpdate:  # Another worker reserved it again, or finished it, meanwhile.
        return False
    return True


def reclaim(args) -> int:
    """Marks `interrupted` the trials that this Slurm job, now requeued, left `reserved`.

    Its workers then resume them at once, instead of Oríon handing them out again only once
    their heartbeat is 5 x ORION_HEARTBEAT old (see README, "Preemption"). A trial is ours
    when it is still reserved, its heartbeat predates this run of the job (--since: no live
    worker has touched it since), and its folder's worker.json names this job *and this very
    reservation* (the trial's start_time, which Oríon sets at each reservation): a worker of
    another job that reserved the trial before we restarted, but has not yet written its own
    worker.json, leaves ours from an earlier reservation, which then does not match.
    """
    try:
        experiment = get_experiment(args.experiment, mode="w", storage=storage(args.database))
    except NoConfigurationError:  # The job was killed before its first trial (e.g. while staging).
        print(f"No experiment {args.experiment} in {args.database} yet: no trial to take back")
        return 0
    # Oríon stores heartbeats as naive UTC datetimes.
    since = datetime.datetime.fromtimestamp(args.since, datetime.timezone.utc).replace(tzinfo=None)
    for trial in experiment.fetch_trials_by_status("reserved"):
        if trial.heartbeat is not None and trial.heartbeat >= since:
            continue
        worker = worker_of(Path(args.trials_dir, trial.id))
        if worker.get("slurm_job") != args.job_id or worker.get("reserved_at") != iso(trial.start_time):
            continue
        if mark_interrupted(experiment, trial):
            print(f"Trial {trial.id} was left reserved when this job was killed: marked interrupted")
    return 0


# --- hunt: `orion hunt`, with an exact budget ------------------------------------------------
# Oríon 0.2.7 hands out trials until `max_trials` have *completed*: W workers run up to
# max_trials + W - 1 trials, and a worker with nothing left waits a minute, then raises
# LazyWorkers. Trials are produced (suggested and registered) by one worker at a time, under
# the experiment's algorithm lock, in `Producer.produce`; we replace that method and
# `Experiment.is_done` for this process only (Oríon is dormant upstream; see README,
# "Troubleshooting and Oríon quirks"). Broken trials do not count: the search replaces them, up to max_broken.


def trials_left(experiment, trials) -> int:
    """How many more trials the budget (max_trials) allows: every trial counts but broken ones."""
    return experiment.max_trials - sum(trial.status != "broken" for trial in trials)


def produce_within_budget(self, pool_size, timeout=None, retry_interval=1) -> int:
    """Oríon's `Producer.produce`, suggesting no more trials than the budget has left."""
    produced = 0
    if trials_left(self.experiment, self.experiment.fetch_trials(with_evc_tree=False)) <= 0:
        # Budget used: this worker waits for the last trials (`done_within_budget`). Oríon's
        # runner asks again at once, a dozen database operations each time: not more often.
        time.sleep(min(5.0, orion.core.config.worker.heartbeat / 4))
        return 0
    # Not Oríon's 60 s: long enough to see a stale lock (`algorithm_lock`).
    timeout = ALGORITHM_LOCK_TIMEOUT if timeout is None else timeout
    with self.experiment.acquire_algorithm_lock(timeout=timeout, retry_interval=retry_interval) as algorithm:
        trials = self.experiment.fetch_trials(with_evc_tree=False)
        # Results the algorithm missed: their worker was killed, or took a SIGTERM, between the
        # trial's end and `observe` (see `observe_patiently`). Shown now, so that it suggests on them.
        missed = [trial for trial in trials if trial.status in ("completed", "broken")
                  and not algorithm.has_observed(trial)]
        if missed:
            algorithm.observe(as_the_algorithm_sees_them(algorithm, missed))
            shown = ", ".join(t.id for t in missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
            print(f"The algorithm sees now the result of trial(s) {shown}, which it had missed", flush=True)
        # Counted under the lock: no other worker produces meanwhile.
        left = trials_left(self.experiment, trials)
        for trial in algorithm.suggest(min(pool_size, left)) if left > 0 else []:
            try:
                self.experiment.register_trial(trial)
                produced += 1
            except DuplicateKeyError:  # The algorithm suggested a trial it had already.
                pass
    return produced


ORIONS_IS_DONE = Experiment.is_done  # Before `hunt` replaces it.


# The end of a search: once the budget is handed out, a worker with nothing to run used to exit
# at once, even while other workers' trials were still reserved: when the last of those workers
# died (SIGKILL, node failure), no worker was left to resume its trial once it counted as lost,
# and the search ended short, exit 0. Now a worker that has run a trial stays while any trial is
# reserved (it polls every ORION_HEARTBEAT / 4 s, at most 5 s), and resumes a trial that
# becomes lost; a worker that never got one (a spare: more workers than trials) still exits at
# once, since the workers that did get one stay. (Up to `idle_timeout`, as for any idle worker.)
RAN_A_TRIAL = threading.Event()


def done_within_budget(self) -> bool:
    """Oríon's `is_done`, or: the budget is used up, no trial is waiting for a worker, and (for a
    worker that has run a trial) no trial is still reserved by another.

    A waiting trial is `new`, `interrupted` (preempted), or `reserved` by a worker that died
    (no heartbeat for 5 x ORION_HEARTBEAT: Oríon then hands it out again).
    """
    EXPERIMENT[:] = [self]
    if ORIONS_IS_DONE.fget(self):
        return True
    lost_before = datetime.datetime.utcnow() - datetime.timedelta(seconds=5 * orion.core.config.worker.heartbeat)
    trials = self.fetch_trials(with_evc_tree=False)  # One read of the database for all questions.
    waiting = [
        trial for trial in trials
        if trial.status in ("new", "interrupted")
        or (trial.status == "reserved" and trial.heartbeat is not None and trial.heartbeat <= lost_before)
    ]
    if trials_left(self, trials) > 0 or waiting:
        return False
    return not (RAN_A_TRIAL.is_set() and any(trial.status == "reserved" for trial in trials))



# More faults that Oríon 0.2.7 does not handle in a worker:
# - A trial killed with SIGKILL (the kernel's out-of-memory killer, `scancel --signal=KILL`)
#   became `broken` and counted toward max_broken, like a failure of main.py itself. The cluster
#   ended it, not main.py: it becomes `interrupted`, resumed later from its last checkpoint, and
#   this worker stops (its job says why), so a configuration that always exhausts the host's
#   memory costs each worker one try, not a loop. See README, "How a trial ends".
# - After each trial, a worker waits for the algorithm's lock (a flag in the database, polled
#   every second) to show the result to the algorithm, for at most 60 s, hard-coded; with 50
#   workers or more on one PickledDB the wait can be longer, and the worker died of
#   LockAcquisitionTimeout (benchmarks/db_stress.py; README, "Many workers on one database").
ALGORITHM_LOCK_TIMEOUT = 600  # s


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


# ASHA and Hyperband keep a broken trial in its rung with no objective: a rung that needs it
# never fills, nothing more is promoted, and the search stalls (orion/algo/hyperband.py). They
# are shown such a trial as completed with an infinite objective instead (the database keeps it
# `broken`): its rung fills, it is never promoted, and a trial replaces it within the budget.
def as_the_algorithm_sees_them(algorithm, trials: list) -> list:
    """The trials to show the algorithm: for ASHA and Hyperband, a broken one as the worst completed."""
    if not isinstance(algorithm.unwrapped, Hyperband):
        return trials
    shown = []
    for trial in trials:
        if trial.status == "broken":
            trial = copy.deepcopy(trial)
            trial.status = "completed"
            trial.results = [Trial.Result(name="objective", type="objective", value=float("inf"))]
        shown.append(trial)
    return shown


def observe_patiently(self, trial) -> None:
    """Oríon's `Producer.observe`, waiting up to ALGORITHM_LOCK_TIMEOUT for the algorithm's lock,
    unless a SIGTERM is pending."""
    LOCK_WAIT.unless_signalled = True
    try:
        with self.experiment.acquire_algorithm_lock(timeout=ALGORITHM_LOCK_TIMEOUT) as algorithm:
            algorithm.observe(as_the_algorithm_sees_them(algorithm, [trial]))
    except ObserveLater:
        print(f"warning: signalled while waiting for the algorithm lock: the result of trial {trial.id} is saved, "
              "and the algorithm sees it at the next suggestion", file=sys.stderr, flush=True)
    finally:
        LOCK_WAIT.unless_signalled = False


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
# experiment size, with Oríon's copies and with these; tests/test_orion_tools.py checks that a
# TPE search suggests exactly the same trials either way.
def pickled_copy(value):
    """`copy.deepcopy` of a picklable value, by a pickle round trip."""
    return pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))


def install_fast_algorithm_copies() -> None:
    """Oríon's algorithm registry and wrappers copy their state with `pickled_copy`."""
    fast_copy = types.SimpleNamespace(copy=copy.copy, deepcopy=pickled_copy)
    for module in (orion.algo.base.registry, orion.core.worker.algo_wrappers.algo_wrapper,
                   orion.core.worker.algo_wrappers.insist_suggest):
        module.copy = fast_copy


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
    while True:
        mine = datetime.datetime.utcnow()
        document = self._db.read_and_write("algo", query=dict(experiment=uid, locked=0),
                                           data=dict(locked=1, heartbeat=mine))
        if document is not None:
            break
        [current] = self._db.read("algo", {"experiment": uid}) or [None]
        now = time.monotonic()
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


# --- The heartbeat of a running trial -----------------------------------------------------------
# Every worker, before it reserves a trial, marks `interrupted` (lost, to be run again) every
# reserved trial whose heartbeat is older than 5 x ORION_HEARTBEAT (Oríon's rule, in
# `fetch_lost_trials`), without looking again. Oríon 0.2.7's pacemaker wrote the heartbeat
# every 60 s, hard-coded, whatever ORION_HEARTBEAT said; a write that waited for the database
# lock (up to its timeout, 120 s in job.sh) came later still; a DatabaseTimeout or any other
# error (a file server's ESTALE, an unreadable file) ended the thread without a word; and once
# the trial was taken for lost, the pacemaker stopped silently while the trial went on, run a
# second time by another worker in the same folder. Here (`beat`): a heartbeat every
# ORION_HEARTBEAT s; each write waits for the lock no later than 4 x ORION_HEARTBEAT after the
# last heartbeat written, and an error is retried until then; past it, or as soon as the trial
# is no longer reserved by this worker, the trial is stopped (SIGTERM: main.py saves a
# checkpoint; SIGKILL after ORION_HEARTBEAT / 2) and the worker says why in one line and exits
# 1. So a trial either has a heartbeat younger than 5 x ORION_HEARTBEAT, or its worker stopped
# it before anyone can take it for lost: it never runs twice. (The margin, one ORION_HEARTBEAT,
# must also cover the clock difference between nodes: the heartbeat is their local time.)
# While a dead worker's lock marker waits to be broken (a lease), no heartbeat can be written:
# 4 x ORION_HEARTBEAT must outlast it, or every running trial would be stopped.
MIN_HEARTBEAT = math.ceil((DATABASE_LOCK_LEASE + 2 * LOCK_POLL) / 4)  # s
WORKER_STOPPED = threading.Event()  # Set by stop_worker: this worker stops, its trial too.
RUNNING_TRIAL: list = []  # The trial's process while one runs (singleexecutor: one at a time).


def stop_worker(message: str) -> None:
    """Prints `error: message` (once), stops the running trial, and makes this worker exit 1."""
    if WORKER_STOPPED.is_set():
        return
    WORKER_STOPPED.set()
    print(f"error: {message}", file=sys.stderr, flush=True)
    for process in list(RUNNING_TRIAL):
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
            try:
                process.wait(timeout=orion.core.config.worker.heartbeat / 2)
            except subprocess.TimeoutExpired:
                process.kill()


def beat(self) -> None:
    """Oríon's `TrialPacemaker.run`: the heartbeat of a running trial, as described above."""
    interval = orion.core.config.worker.heartbeat
    written = time.monotonic()  # The reservation wrote the first heartbeat.
    while not self.stopped.wait(max(0.0, written + interval - time.monotonic())):
        before = time.monotonic()
        LOCK_WAIT.until = written + 4 * interval
        try:
            if self.storage.update_heartbeat(self.trial):
                written = before
                continue
            # No longer reserved. Once the trial's process has ended, this worker is releasing it
            # (completed, broken, interrupted) and is about to stop this thread: nothing to say.
            if RUNNING_TRIAL:
                status = self.storage.get_trial(self.trial).status
                stop_worker(f"trial {self.trial.id} is {status}, no longer reserved by this worker, while it runs: "
                            f"another worker took it for lost (heartbeat older than 5 x ORION_HEARTBEAT = "
                            f"{5 * interval} s: was this worker stalled?); this worker stopped it and exits")
            return
        except DatabaseLockError as error:
            stop_worker(str(error))
            return
        except Exception as error:  # DatabaseTimeout, an unreadable file, ESTALE...: retried until the deadline.
            problem = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if time.monotonic() >= LOCK_WAIT.until:
                stop_worker(f"the heartbeat of trial {self.trial.id} could not be written for "
                            f"{time.monotonic() - written:.0f} s ({problem}): before another worker takes it for "
                            f"lost, this worker stopped it (it resumes later) and exits; database: "
                            f"{orion.core.config.storage.database.host}")
                return
            print(f"warning: heartbeat of trial {self.trial.id} late ({problem}); trying again",
                  file=sys.stderr, flush=True)
            self.stopped.wait(min(1.0, interval / 4))  # Then again at once: the heartbeat is due.
        finally:
            LOCK_WAIT.until = None


def run_trial(self, cmd_args, environ) -> None:
    """Oríon's `Consumer.execute_process` (the trial's command), where a SIGKILL means `interrupted`,
    not `broken`, and whose process stop_worker can stop."""
    try:
        process = subprocess.Popen(cmd_args, env=environ)
    except PermissionError as error:
        raise InexecutableUserScript(" ".join(cmd_args)) from error
    RUNNING_TRIAL.append(process)
    RAN_A_TRIAL.set()
    try:
        return_code = process.wait()
    finally:
        RUNNING_TRIAL.remove(process)
    if WORKER_STOPPED.is_set():  # stop_worker said why. Interrupted: resumed later, not broken.
        raise ExecutionError(orion.core.config.worker.interrupt_signal_code)
    if return_code == 0:
        return
    if return_code != -signal.SIGKILL:
        raise ExecutionError(return_code)
    print("error: the trial was killed (SIGKILL: out of host memory? `sacct -j $SLURM_JOB_ID` says); "
          "it is marked interrupted and resumes later from its last checkpoint; this worker stops",
          file=sys.stderr, flush=True)
    # The exit status Oríon's runner takes for "interrupted": it then releases the trial
    # as such and stops, as on Ctrl-C.
    interrupted = ExecutionError(orion.core.config.worker.interrupt_signal_code)
    interrupted.killed = True  # For the worker's record (`consume_and_record`).
    raise interrupted


# What a worker records, for job.sh's verdict and a requeued job's `reclaim` (rather than their
# reading the workers' logs):
# - in the trial's folder, when it starts running the trial: worker.json, naming its Slurm job,
#   host and pid, and the reservation (the trial's start_time);
# - in --worker-records DIR, one file per worker: a JSON line per trial it ran, with how it ended.
ORIONS_CONSUMER_CALL = Consumer.__call__
WORKER_RECORDS: Path | None = None  # hunt's --worker-records.


def iso(moment) -> str | None:
    return moment.isoformat() if moment is not None else None


def write_whole(path: Path, text: str) -> None:
    """Writes `path` through a temporary name of its own, then renames it: a reader, or another
    worker, never sees half of it."""
    temporary = temporary_path(path.with_name(f".{path.name}"))  # Hidden: `ls` shows whole files only.
    Path(temporary).write_text(text)
    os.replace(temporary, path)


def record_worker(trial) -> None:
    write_whole(Path(trial.working_dir, WORKER_FILE), json.dumps({
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
        "reserved_at": iso(trial.start_time)}))


def record_outcome(trial, outcome: str) -> None:
    if WORKER_RECORDS is None:
        return
    line = json.dumps({"trial": trial.id, "outcome": outcome, "end": time.time()}) + "\n"
    with open(WORKER_RECORDS / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as file:
        file.write(line)


def keep_trial_tracebacks_in_the_workers_log(record: logging.LogRecord) -> bool:
    """Oríon's runner logs a broken trial's whole traceback (20 lines ending in `ExecutionError`,
    the trial's exit code, three times for three broken trials), after the trial's own one error
    line: that traceback goes to the worker's log, --worker-records DIR/HOST-PID.log, not to the
    job's output. Other messages of the runner pass."""
    message = record.getMessage()
    if WORKER_RECORDS is None or "ExecutionError" not in message:
        return True
    with open(WORKER_RECORDS / f"{socket.gethostname()}-{os.getpid()}.log", "a") as file:
        file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {record.levelname} {record.name}: {message}\n")
    return False


def consume_and_record(self, trial, **kwargs):
    """Oríon's run of one trial (`Consumer.__call__`), which records who ran it and how it ended."""
    record_worker(trial)
    try:
        results = ORIONS_CONSUMER_CALL(self, trial, **kwargs)
    except ExecutionError as error:
        interrupted = error.return_code == orion.core.config.worker.interrupt_signal_code
        record_outcome(trial, ("killed" if getattr(error, "killed", False) else "interrupted")
                       if interrupted else "broken")
        raise
    except KeyboardInterrupt:
        record_outcome(trial, "interrupted")
        raise
    except Exception:  # No results file, or an unreadable one: Oríon marks it broken.
        record_outcome(trial, "broken")
        raise
    record_outcome(trial, "completed")
    return results


# A worker that found no trial to run for `idle_timeout` stops with Oríon's LazyWorkers (a
# traceback), which job.sh took for "done". It is, only when nothing is left for this worker:
# the budget is reached, or the trials left are reserved by live workers (fresh heartbeat),
# which stay until the end (`done_within_budget`). Otherwise the search is stuck: ASHA, for one,
# keeps a broken trial in its rung with no objective, so a rung that needs it never fills and
# no trial is promoted (orion/algo/hyperband.py). Then one line, exit 1.
EXPERIMENT: list = []  # The experiment this worker runs, once `done_within_budget` has seen it.


def idle_verdict() -> int:
    """After LazyWorkers: 0 if nothing is left for this worker, else one line and 1."""
    experiment = EXPERIMENT[0]
    trials = experiment.fetch_trials(with_evc_tree=False)
    completed = sum(trial.status == "completed" for trial in trials)
    lost_before = datetime.datetime.utcnow() - datetime.timedelta(seconds=5 * orion.core.config.worker.heartbeat)
    running = [trial for trial in trials if trial.status == "reserved"
               and trial.heartbeat is not None and trial.heartbeat > lost_before]
    if completed >= experiment.max_trials:
        print("No trial left for this worker: done.", flush=True)
        return 0
    if running:
        print(f"No trial left for this worker; {len(running)} trial(s) still run in other workers, "
              "which finish the search.", flush=True)
        return 0
    broken = [trial.id for trial in trials if trial.status == "broken"]
    algorithm = next(iter(experiment.configuration["algorithm"]))
    why = (f"{algorithm} suggests no more trials while {len(broken)} trial(s) are "
           f"broken (ASHA and Hyperband wait for a broken trial's rung): fix their cause (their train.log), "
           "then run a new experiment (ORION_EXPERIMENT=<new name>)" if broken else
           "the algorithm suggests no more trials: see `python orion_tools.py summary`")
    print(f"error: search {experiment.name} stopped at {completed} of {experiment.max_trials} completed trials, "
          f"no trial to run for idle_timeout: {why}", file=sys.stderr, flush=True)
    return 1


def hunt(hunt_arguments: list[str]) -> int:
    """`orion hunt ARGUMENTS...` that runs exactly max_trials trials, whatever the number of workers.

    A worker with nothing left to run exits 0 at once. `--worker-records DIR` first: where it
    records the trials it runs.
    """
    global WORKER_RECORDS
    if hunt_arguments[:1] == ["--worker-records"]:
        WORKER_RECORDS, hunt_arguments = Path(hunt_arguments[1]), hunt_arguments[2:]
        WORKER_RECORDS.mkdir(parents=True, exist_ok=True)
    Consumer.__call__ = consume_and_record
    logging.getLogger("orion.client.runner").addFilter(keep_trial_tracebacks_in_the_workers_log)
    Producer.produce = produce_within_budget
    Producer.observe = observe_patiently
    Experiment.is_done = property(done_within_budget)
    TrialPacemaker.run = beat
    Legacy.acquire_algorithm_lock = algorithm_lock
    install_fast_algorithm_copies()
    Protected.handler = note_signal
    Consumer.execute_process = run_trial
    if orion.core.config.worker.heartbeat < MIN_HEARTBEAT:
        print(f"error: ORION_HEARTBEAT={orion.core.config.worker.heartbeat} s is too short: a heartbeat must be able "
              f"to wait out the database lock's lease ({DATABASE_LOCK_LEASE:.0f} s, orion_tools.py); use at least "
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


# --- job-verdict: what a job ran, and its exit code ---------------------------------------------
# `orion hunt` exits 0 even when every trial broke. The verdict comes from what the job's workers
# recorded (--worker-records) and from the database, never from their logs.


def read_worker_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # A line cut short by a kill.
                continue
    return records


def job_verdict(args) -> int:
    """Says what this job's workers ran and how it ended; exit 1 if a trial broke or was killed, or a
    worker failed (--hunt-status: one that stopped while the search was stuck, among others)."""
    records = read_worker_records(Path(args.worker_records))
    outcomes = collections.Counter(r.get("outcome") for r in records)
    ran = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
    print(f"This job ran {sum(outcomes.values())} trial(s) of experiment {args.experiment}"
          + (f": {ran}" if ran else ""))
    db = f"ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS={args.database}"
    verdict = 0
    if outcomes["broken"]:
        print(f"error: {outcomes['broken']} trial(s) of this job broke; their logs are in "
              f"{trials_dir_of(args)}/<trial id>/train.log", file=sys.stderr)
        verdict = 1
        experiment, trials = open_experiment(args)
        # Past max_broken, Oríon runs no trial of this experiment any more, in any job. (A worker
        # also stops after worker.max_broken, 3, broken trials of its own.)
        broken = sum(t.status == "broken" for t in trials)
        remove = f"remove them with: {db} uv run orion db rm {args.experiment} --status broken --force"
        if broken >= experiment.max_broken:
            print(f"error: experiment {args.experiment} has too many broken trials ({broken}, max_broken "
                  f"{experiment.max_broken}) and runs nothing more: fix the cause (a broken trial's train.log), "
                  f"then {remove}", file=sys.stderr)
        else:
            print(f"error: experiment {args.experiment} has {broken} broken trial(s); at {experiment.max_broken} "
                  f"(max_broken) it runs nothing more. Once the cause is fixed, {remove}", file=sys.stderr)
    if outcomes["killed"]:
        # Its worker stopped; the trial is `interrupted` and the next worker resumes it (README, "How a trial ends").
        print(f"error: {outcomes['killed']} trial(s) of this job were killed (SIGKILL: out of host memory?); they "
              "resume in the next job or worker. If it keeps happening: sacct -j "
              f"{os.environ.get('SLURM_JOB_ID', '<job id>')} --format=JobID,State,MaxRSS", file=sys.stderr)
        verdict = 1
    if args.hunt_status != 0 and verdict == 0:
        print(f"error: a worker of this job failed (exit status {args.hunt_status}; see above)", file=sys.stderr)
        verdict = 1
    return verdict


# --- summary and report: what the search found ------------------------------------------------
# Read-only: they open the experiment in Oríon's "r" mode, so they run alongside the workers.
# A trial's folder, <trials dir>/<trial id>/, holds main.py's metrics.jsonl (one record per
# epoch). An ASHA promotion starts in a copy of its parent's folder: the parent's records appear
# again, identical (same end_time), in the child's file; counted once (`unique_epochs`).

class ReportError(Exception):
    """The experiment cannot be read or holds no trial: one line for the user, exit 1."""


def open_experiment(args):
    """The experiment, read-only, and its trials; ReportError if it is missing or broken."""
    if not args.database:
        raise ReportError("no database: pass --database FILE or export ORION_DB_ADDRESS")
    if not Path(args.database).is_file():
        raise ReportError(f"no database {args.database}: has the search started? (--database, $ORION_DB_ADDRESS)")
    try:
        experiment = get_experiment(args.experiment, mode="r", storage=storage(args.database))
        trials = experiment.fetch_trials(with_evc_tree=False)
    except NoConfigurationError:
        raise ReportError(f"no experiment {args.experiment} in {args.database} "
                          f"(--experiment, $ORION_EXPERIMENT)") from None
    except Exception as error:  # A truncated or foreign file, an unreadable experiment...
        try:  # Oríon 0.2.7's setup_storage hides why the file did not load behind a TypeError.
            with open(args.database, "rb") as file:
                pickle.load(file)
        except Exception as load_error:
            raise ReportError(f"{args.database} is not a readable PickledDB file (damaged, or not Oríon's): "
                              f"{type(load_error).__name__}: {load_error}") from None
        raise ReportError(f"cannot read experiment {args.experiment} from {args.database}: "
                          f"{type(error).__name__}: {error}") from None
    if not trials:
        raise ReportError(f"experiment {args.experiment} in {args.database} has no trial yet")
    return experiment, trials


def trials_dir_of(args) -> Path:
    return Path(args.trials_dir) if args.trials_dir else Path(args.database).parent / args.experiment


def by_status(trials) -> str:
    """'7 completed, 2 reserved, 1 new' (most frequent first)."""
    counts = collections.Counter(trial.status for trial in trials)
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items(), key=lambda s: (-s[1], s[0])))


def best_trial(trials):
    """The completed trial with the lowest objective (None: none completed yet)."""
    completed = [t for t in trials if t.status == "completed" and t.objective is not None]
    return min(completed, key=lambda t: t.objective.value, default=None)


def format_params(trial) -> str:
    return ", ".join(f"{name.lstrip('/')}={value:.4g}" if isinstance(value, float) else f"{name.lstrip('/')}={value}"
                     for name, value in sorted(trial.params.items()))


def is_done(experiment, trials) -> bool:
    """All max_trials trials completed (orion_tools.py hunt runs exactly that many)."""
    return sum(t.status == "completed" for t in trials) >= experiment.max_trials


def summary_lines(experiment, trials) -> list[str]:
    """The one- or two-line summary: trials by status, the best objective so far and its hyperparameters."""
    lines = [(f"Experiment {experiment.name}: {len(trials)} trials ({by_status(trials)}), "
              f"budget {experiment.max_trials}{', done' if is_done(experiment, trials) else ''}")]
    best = best_trial(trials)
    if best is None:
        lines.append("No trial completed yet: no best objective so far")
    else:
        lines.append(f"Best objective so far: {best.objective.value:.4f} (trial {best.id}: {format_params(best)})")
    return lines


def summary(args) -> int:
    """Prints trials by status and the best objective so far (no plots: cheap)."""
    experiment, trials = open_experiment(args)
    print("\n".join(summary_lines(experiment, trials)))
    return 0


def read_metrics(trial_dir: Path) -> list[dict]:
    """A trial's metrics.jsonl records ([]: none yet); skips a line cut short by a kill."""
    path = trial_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            records.append(record)
    return records


def unique_epochs(metrics: dict[str, list[dict]]) -> list[dict]:
    """Every epoch trained, once: a record copied into a promoted trial's folder counts once."""
    unique = {}
    for trial_id, records in metrics.items():
        for record in records:
            key = (record.get("end_time"), record.get("epoch")) if record.get("end_time") is not None \
                else (trial_id, record.get("epoch"))
            unique.setdefault(key, record)
    return list(unique.values())


def device_time(records: list[dict]) -> tuple[float, str]:
    """Seconds of training and validation, and the devices they ran on ('cuda', 'cpu', ...)."""
    seconds = sum((r.get("train_seconds") or 0) + (r.get("val_seconds") or 0) for r in records)
    return seconds, "+".join(sorted({str(r.get("device", "?")) for r in records})) or "no device"


def learning_curves(trials, metrics: dict[str, list[dict]]):
    """The objective (what main.py reports, under its name) against epochs, from each trial's
    metrics.jsonl: one line per trial with metrics, the best one bold; epoch 0 is the untrained model."""
    import plotly.graph_objects as go

    best = best_trial(trials)
    max_epoch = max((r["epoch"] + 1 for records in metrics.values() for r in records), default=0)
    names = {result.name for trial in trials for result in trial.results if result.type == "objective"}
    name = names.pop() if len(names) == 1 else "objective"
    figure = go.Figure()
    for trial in trials:
        records = sorted(metrics.get(trial.id, []), key=lambda r: r["epoch"])
        if not records:
            continue
        is_best = best is not None and trial.id == best.id
        untrained = [(0, records[0].get("untrained_objective"))] if records[0].get("epoch") == 0 else []
        points = untrained + [(r["epoch"] + 1, r.get("objective")) for r in records]
        figure.add_trace(go.Scatter(
            x=[x for x, _ in points], y=[y for _, y in points],
            mode="lines+markers", name=f"{trial.id[:8]} ({trial.status})" + (" best" if is_best else ""),
            line=dict(width=4 if is_best else 1.5), marker=dict(size=6 if is_best else 4),
            opacity=1.0 if is_best else 0.6,
        ))
    figure.update_layout(title=f"Learning curves: {name} per epoch (Oríon minimizes it), one line per trial",
                         xaxis_title="Epochs trained", yaxis_title=name,
                         xaxis_dtick=1 if max_epoch <= 20 else None,
                         showlegend=len(figure.data) <= 20, width=1000, height=600)
    return figure


def figures(experiment, trials, metrics) -> list[tuple[str, str, object]]:
    """(file name, the function that makes the figure or the reason there is none) per plot."""
    completed = sum(t.status == "completed" for t in trials)
    numeric = all(dim.type in ("real", "integer", "fidelity") for dim in experiment.space.values())
    reasons = {
        "regret": None if completed >= 1 else "no trial completed yet",
        "parallel_coordinates": None if completed >= 1 else "no trial completed yet",
        # Oríon fits a regression model (a random forest) to the completed trials.
        "partial_dependencies": None if completed >= PARTIAL_DEPENDENCE_MIN_TRIALS and numeric
        else f"needs {PARTIAL_DEPENDENCE_MIN_TRIALS} completed trials ({completed} so far)" if numeric
        else "needs a space of numbers only",
        "learning_curves": None if any(metrics.values()) else "no trial has a metrics.jsonl yet",
    }
    makers = {
        "regret": lambda: experiment.plot.regret(),
        "parallel_coordinates": lambda: experiment.plot.parallel_coordinates(),
        "partial_dependencies": lambda: experiment.plot.partial_dependencies(),
        "learning_curves": lambda: learning_curves(trials, metrics),
    }
    return [(f"{name}.png", reasons[name] or makers[name]) for name in makers]


PARTIAL_DEPENDENCE_MIN_TRIALS = 5


def write_png(figure, path: Path) -> None:
    """Writes the figure as PNG through kaleido, all at once (readers never see half a file)."""
    temporary = temporary_path(path.with_name(f".{path.name}"))
    figure.write_image(str(temporary), format="png", width=figure.layout.width or 1000,
                       height=figure.layout.height or 600)
    os.replace(temporary, path)


def report(args) -> int:
    """Writes the search's report (plots as PNG and summary.txt) and prints its summary."""
    experiment, trials = open_experiment(args)
    if args.if_done and not is_done(experiment, trials):
        # The summary last: a job's output ends with where the search stands (README).
        print(f"The search is not done: no report yet (make one now with: uv run python orion_tools.py report "
              f"--experiment {args.experiment} --database {args.database} --trials-dir {trials_dir_of(args)})")
        print("\n".join(summary_lines(experiment, trials)))
        return 0
    trials_dir = trials_dir_of(args)
    if not trials_dir.is_dir():
        print(f"warning: no trial folders in {trials_dir}: no learning curves or epochs; pass --trials-dir "
              "(orion hunt's --working-dir)", file=sys.stderr)
    output = Path(args.output) if args.output else Path(args.database).parent / f"{args.experiment}-report"
    output.mkdir(parents=True, exist_ok=True)
    metrics = {trial.id: read_metrics(trials_dir / trial.id) for trial in trials}

    written, not_made, failed = [], [], False
    for file_name, maker in figures(experiment, trials, metrics):
        if isinstance(maker, str):
            not_made.append(f"{file_name}: not made: {maker}")
            continue
        try:
            write_png(maker(), output / file_name)
            written.append(file_name)
        except Exception as error:  # kaleido or Oríon's plotting: the rest of the report still helps.
            not_made.append(f"{file_name}: FAILED: {type(error).__name__}: {error}")
            failed = True

    epochs = unique_epochs(metrics)
    seconds, devices = device_time(epochs)
    best = best_trial(trials)
    lines = [(f"Report of Oríon experiment {experiment.name} ({args.database}), "
              f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")]
    lines.append(f"Trials: {len(trials)} of a budget of {experiment.max_trials} ({by_status(trials)})"
                 + ("; the search is done" if is_done(experiment, trials) else "; the search is not done"))
    if best is None:
        lines.append("Best: no trial completed yet")
    else:
        lines += [f"Best objective: {best.objective.value:.4f} ({best.objective.name})",
                  f"Best hyperparameters: {format_params(best)}",
                  f"Best trial: {best.id}, folder {trials_dir / best.id}"]
    lines.append(f"Epochs trained: {len(epochs)} (in {sum(bool(r) for r in metrics.values())} trial folders; "
                 f"an epoch copied into a promoted trial's folder counts once)")
    lines.append(f"Device time (training + validation): {seconds / 3600:.2f} h ({seconds:.0f} s on {devices})")
    lines.append(f"Files in {output}:")
    lines += [f"  {name}" for name in [*written, "summary.txt"]]
    lines += [f"  {line}" for line in not_made]
    text = "\n".join(lines) + "\n"
    write_whole(output / "summary.txt", text)
    print(text, end="")
    if failed:
        print("error: some plots of the report failed (see above)", file=sys.stderr)
    print(f"Report: {output}")
    return 1 if failed else 0


# --- check-database: never start a search over from an emptied database ------------------------
# PickledDB rewrites the whole file at every operation (temporary file + rename, no fsync):
# after a crash of the file server the file can be empty or truncated. Oríon reads an empty
# file as an empty database (`orion status`: "No experiment found"; a new hunt starts over),
# and the first Oríon command that opens it, `orion info` included, writes it back as a valid
# empty database: so the check also compares the experiment's completed trials with the backup's.


def read_database(path: Path):
    """The database as PickledDB keeps it (an EphemeralDB; None: no file), or why it is unreadable."""
    if not path.exists():
        return None, None
    if path.stat().st_size == 0:
        return None, "is empty"
    try:
        with open(path, "rb") as file:
            return pickle.load(file), None
    except Exception as error:  # Truncated, or not a pickle at all.
        return None, f"is not readable ({type(error).__name__}: {error})"


def completed_trials(database, experiment: str) -> int:
    """How many trials of the experiment (all its versions) completed, in an EphemeralDB."""
    if database is None:
        return 0
    ids = [document["_id"] for document in database.read("experiments", {"name": experiment})]
    return sum(database.count("trials", {"experiment": id_, "status": "completed"}) for id_ in ids)


def check_database(args) -> int:
    """Refuses a damaged database, or one that lost completed trials (exit 1); else backs it up.

    The backup, `<database>.bak`, is the last copy that a job found readable.
    """
    path, backup_path = Path(args.database), Path(f"{args.database}.bak")
    # The backup first: it is a copy of the database as it was earlier, so while other jobs
    # complete trials and back up, the database read second never holds fewer than it.
    backup, _ = read_database(backup_path)
    database, problem = read_database(path)
    restore = f"restore the last good copy: cp {backup_path} {path}"
    if problem:
        recovery = restore if backup_path.is_file() else "no backup exists: move it away to start a new search"
        print(f"error: the Oríon database {path} {problem}; {recovery}", file=sys.stderr)
        return 1
    if args.experiment:
        in_database, in_backup = completed_trials(database, args.experiment), completed_trials(backup, args.experiment)
        if in_database < in_backup:
            print(f"error: the Oríon database {path} holds fewer completed trials of {args.experiment} "
                  f"({in_database}) than its backup ({in_backup}): {restore}, "
                  f"or, if you removed them on purpose, delete {backup_path}", file=sys.stderr)
            return 1
    if database is None:
        return 0  # A new search.
    temporary = temporary_path(backup_path)  # Two jobs with one pid (other nodes, containers) must not collide.
    shutil.copyfile(path, temporary)
    os.replace(temporary, backup_path)  # Several jobs may back up at once: each rename is whole.
    return 0


# --- check-experiment: one experiment, one set of settings ----------------------------------------
# What Oríon 0.2.7 does otherwise, at the start of `orion hunt`: a malformed prior is a
# traceback; an experiment run again with other main.py arguments or priors runs on after a
# warning ("Running experiment in a different state"), its new trials mixed with the old ones;
# another algorithm, or the same one configured otherwise (TPE's n_initial_points follows the
# number of workers in job.sh), stops every worker with a traceback ("Algorithm configuration
# changed since last experiment execution"). Oríon keeps the experiment's trial command, priors
# included, as given to `orion hunt`, in its metadata (`user_args`).


def prior_problem(trial_command: list[str]) -> str | None:
    """The first prior of the trial command that Oríon cannot build, and why (None: all good)."""
    parser = OrionCmdlineParser(allow_non_existing_files=True)
    try:
        parser.parse(trial_command)
    except Exception as error:
        return f"Oríon cannot read the priors of `{shlex.join(trial_command)}`: {type(error).__name__}: {error}"
    if not parser.priors:
        return "no prior at all: job.sh's `priors` (step 1) must name at least one"
    for name, expression in parser.priors.items():
        try:
            SpaceBuilder().build({name: expression})  # What `orion hunt` does with each prior.
        except Exception as error:
            # Oríon's TypeErrors start with "Parameter '/name': " and may go on with scipy's docs.
            reason = re.split(r"\n(?:Scipy Docs|Provided)", str(error))[0].removeprefix(f"Parameter '{name}': ")
            if not isinstance(error, TypeError):
                reason = f"{type(error).__name__}: {reason}"
            reason = " ".join(reason.split()).rstrip(".")
            return f"the prior --{name.lstrip('/')}~'{expression}' is not valid: {reason}"
    return None


def check_trial_arguments(main, argv: list[str]) -> None:
    """What job.sh checks before any trial (step 2), with main.py imported: main.py's parse_args
    accepts the arguments after job.sh, and each prior's values at both ends of its range (a
    prior wider than parse_args allows would break every trial that draws past it). Exits 2 with
    one error line if not; else prints the file of main.py's data set module, which job.sh stages.
    """
    arguments, priors = split_priors(argv)
    why = parse_args_refusal(main, arguments)
    if why:
        print(f"error: main.py refuses the arguments after job.sh ({why}): correct them and submit again",
              file=sys.stderr)
        sys.exit(2)
    for name, prior in priors.items():
        try:
            [dimension] = SpaceBuilder().build({name.lstrip("-"): prior}).values()
        except Exception:
            continue  # A malformed prior: check-experiment says why, in step 4.
        ends = dimension.interval() if dimension.type != "categorical" else dimension.categories
        for value in ends:
            why = parse_args_refusal(main, [*arguments, f"{name}={value}"])
            if why and "unrecognized arguments" in why:
                print(f"error: the prior {name}~'{prior}' in job.sh names no argument of main.py ({why}): correct "
                      "its name in job.sh's priors, or add the argument to main.py's parse_args", file=sys.stderr)
                sys.exit(2)
            if why:
                hint = (" (an integer argument needs a prior of whole numbers: add discrete=True)"
                        if "invalid integer value" in why else "")
                print(f"error: the prior {name}~'{prior}' in job.sh reaches {value}, which main.py refuses ({why}): "
                      f"keep its range within what main.py's parse_args accepts{hint}", file=sys.stderr)
                sys.exit(2)
    print(main.dataset.__file__)


def parse_args_refusal(main, argv: list[str]) -> str | None:
    """Why main.py's parse_args refuses these arguments, from its one error line (None: it accepts them)."""
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            main.parse_args(argv)
    except SystemExit as exit:
        if exit.code in (0, None):  # --help.
            return "--help: job.sh runs trials, it shows no help"
        return refused.getvalue().strip().removeprefix("main.py: error: ").removesuffix(" (see --help)")
    return None


def stage_data(args) -> int:
    """Stages the data set of main.py's data set module (--module FILE) in --destination: job.sh, step 2,
    once per node. The module's `stage(destination, source)`, from $SOURCE_VARIABLE or its DEFAULT_SOURCE,
    after a check that the node has room for it: the module's `staged_bytes(source)`, else the
    source's size (a file, or every file below a folder)."""
    spec = importlib.util.spec_from_file_location(Path(args.module).stem, args.module)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    source = Path(os.environ.get(module.SOURCE_VARIABLE) or module.DEFAULT_SOURCE)
    destination = Path(args.destination)
    try:
        destination.mkdir(parents=True, exist_ok=True)
        needed = module.staged_bytes(source) if hasattr(module, "staged_bytes") else size_on_disk(source)
        free = shutil.disk_usage(destination).free
        if needed > free:
            print(f"error: {destination} on {socket.gethostname()} has {free // 10**6:,} MB free, and staging "
                  f"{Path(args.module).name}'s data set from {source} needs about {needed // 10**6 + 1:,} MB: "
                  f"{more_space_advice(needed)}", file=sys.stderr)
            return 1
        module.stage(destination, source)
    except (OSError, ValueError) as error:  # cifar10.DataError is a ValueError.
        print(f"error: {error}" if isinstance(error, ValueError) else
              f"error: staging {Path(args.module).name}'s data set from {source} in {args.destination} failed "
              f"({error})", file=sys.stderr)
        return 1
    print(f"Staged {Path(args.module).name}'s data set from {source} ({module.SOURCE_VARIABLE}) in "
          f"{args.destination} on {socket.gethostname()}", flush=True)
    return 0


def size_on_disk(source: Path) -> int:
    """Bytes of a file, or of every file below a folder (0 if it does not exist: the module says why)."""
    if source.is_file():
        return source.stat().st_size
    return sum(path.stat().st_size for path in source.rglob("*") if path.is_file()) if source.is_dir() else 0


def more_space_advice(needed: int) -> str:  # Under Slurm, or a dry run of job.sh.
    if "SLURM_JOB_ID" in os.environ:
        return (f"ask for nodes with more local disk (sbatch --tmp={needed // 10**6 + 1}M, where the cluster sets "
                "it), or read the data in place (README, \"Data larger than memory\")")
    return "export TMPDIR=a folder with more space (this dry run's $SLURM_TMPDIR is made there)"


def split_priors(trial_command: list[str]) -> tuple[list[str], dict[str, str]]:
    """(the arguments that are not priors, {'--name': 'prior'}), as Oríon tells them apart."""
    arguments, priors = [], {}
    for argument in trial_command:
        name, tilde, prior = argument.partition("~")
        # Oríon's rule (OrionCmdlineParser._replace_priors): `-name~prior`, but `~/` is a path.
        if argument.startswith("-") and tilde and prior and not prior.startswith("/"):
            priors[name] = prior
        else:
            arguments.append(argument)
    return arguments, priors


def main_py_arguments(arguments: list[str]) -> list[str]:
    """The arguments after the script, without the `--checkpoint-dir {trial.working_dir}` job.sh adds."""
    script = next((i for i, argument in enumerate(arguments) if argument.endswith(".py")), -1)
    shown = arguments[script + 1:]
    for i in range(len(shown) - 1):
        if "{trial." in shown[i + 1]:
            return shown[:i] + shown[i + 2:]
    return shown


def settings_differences(stored_command, stored_algorithm, trial_command, algorithm) -> list[str]:
    """What differs between the experiment's settings and this job's, one phrase each."""
    def quoted(arguments):
        return f"`{shlex.join(arguments)}`" if arguments else "none"

    if stored_command is None:
        return ["no trial command: it was not started by job.sh"]
    differences = []
    (stored_arguments, stored_priors), (arguments, priors) = split_priors(stored_command), split_priors(trial_command)
    if stored_arguments != arguments:
        was, now = main_py_arguments(stored_arguments), main_py_arguments(arguments)
        if was == now:  # Another script or interpreter: show all.
            was, now = stored_arguments, arguments
        differences.append(f"main.py arguments: was {quoted(was)}, now {quoted(now)}")
    changed = [name for name in {**stored_priors, **priors} if stored_priors.get(name) != priors.get(name)]
    if changed:
        differences.append("search space: " + ", ".join(
            f"{name} was {stored_priors.get(name, 'not searched')}, now {priors.get(name, 'not searched')}"
            for name in changed))
    if stored_algorithm != algorithm:
        differences.append(f"algorithm: was {stored_algorithm}, now {algorithm}")
    return differences


def check_experiment(args) -> int:
    """Refuses a malformed prior, or an experiment rerun with other settings; prints its algorithm.

    The settings are main.py's arguments, the priors, and the algorithm's name. The budget
    (max_trials) may change: that extends the search. The algorithm's other settings may too
    (TPE's n_initial_points follows the number of workers): the experiment keeps its own, and
    the configuration to give Oríon is printed on stdout, as one line of YAML: the stored one
    for an experiment that exists, else --algorithm's.
    """
    problem = prior_problem(args.trial_command)
    if problem:
        print(f"error: {problem}; correct it in job.sh's `priors` (step 1; Oríon's priors: "
              "https://orion.readthedocs.io/en/stable/user/searchspace.html)", file=sys.stderr)
        return 1
    algorithm = yaml.safe_load(args.algorithm)
    [algorithm_name] = algorithm  # {name: {setting: value}}
    database = Path(args.database)
    try:
        if not database.is_file():  # A new search (reading would create the file).
            raise NoConfigurationError(args.experiment)
        experiment = get_experiment(args.experiment, mode="r", storage=storage(args.database))
    except NoConfigurationError:
        print(one_line_yaml(algorithm))
        return 0
    stored_command = experiment.configuration["metadata"].get("user_args")  # None: not made by `orion hunt`.
    lock = experiment.storage.get_algorithm_lock_info(uid=experiment.id)
    # The algorithm's state was saved with this configuration: Oríon resumes it with no other.
    stored_algorithm = lock.configuration if lock is not None else experiment.configuration["algorithm"]
    [stored_algorithm_name] = stored_algorithm
    differences = settings_differences(stored_command, stored_algorithm_name, args.trial_command, algorithm_name)
    if differences:
        print(f"error: experiment {args.experiment} in {args.database} was started with other settings "
              f"({'; '.join(differences)}): for a new search, export ORION_EXPERIMENT=<a new name>; to "
              "continue this one, run job.sh with its original settings", file=sys.stderr)
        return 1
    kept = {name: value for name, value in stored_algorithm[stored_algorithm_name].items()
            if name in algorithm[algorithm_name] and algorithm[algorithm_name][name] != value}
    if kept:
        print(f"Experiment {args.experiment} continues with its algorithm's own settings: "
              + ", ".join(f"{name} {value} (this job's: {algorithm[algorithm_name][name]})"
                          for name, value in kept.items()), file=sys.stderr)
    print(one_line_yaml(stored_algorithm))
    return 0


def one_line_yaml(configuration: dict) -> str:
    """One line of YAML, for `algorithm:` in Oríon's configuration (not JSON: ASHA's repetitions is inf)."""
    return yaml.safe_dump(configuration, default_flow_style=True, width=float("inf")).strip()


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a subparser per subcommand, which names its function in `run`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database", default=os.environ.get("ORION_DB_ADDRESS"),
                        required="ORION_DB_ADDRESS" not in os.environ,
                        help="the PickledDB file (default: $ORION_DB_ADDRESS)")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    subcommands = parser.add_subparsers(required=True)

    command = subcommands.add_parser("reclaim", parents=[common], help=reclaim.__doc__.split("\n")[0])
    command.set_defaults(run=reclaim)
    command.add_argument("--experiment", required=True, help="the experiment's name")
    command.add_argument("--trials-dir", required=True, help="orion hunt's --working-dir")
    command.add_argument("--job-id", required=True, help="this job's $SLURM_JOB_ID")
    command.add_argument("--since", required=True, type=float,
                         help="when this run of the job started, in seconds since the epoch")

    command = subcommands.add_parser("job-verdict", parents=[common], help=job_verdict.__doc__.split("\n")[0])
    command.set_defaults(run=job_verdict)
    command.add_argument("--worker-records", required=True, help="hunt's --worker-records of this job")
    command.add_argument("--hunt-status", required=True, type=int, help="the workers' exit status")
    command.add_argument("--experiment", required=True, help="the experiment's name")
    command.add_argument("--trials-dir", help="orion hunt's --working-dir (default: <database folder>/<experiment>)")

    command = subcommands.add_parser("stage-data", help=stage_data.__doc__.split("\n")[0])
    command.set_defaults(run=stage_data)
    command.add_argument("--module", required=True, help="the data set module's file (main.py's `dataset`)")
    command.add_argument("--destination", required=True, help="the node's local folder: $SLURM_TMPDIR/data")

    command = subcommands.add_parser("check-database", parents=[common], help=check_database.__doc__.split("\n")[0])
    command.set_defaults(run=check_database)
    command.add_argument("--experiment", help="the experiment whose completed trials the backup must not outnumber")

    command = subcommands.add_parser("check-experiment", parents=[common],
                                     help=check_experiment.__doc__.split("\n")[0])
    command.set_defaults(run=check_experiment)
    command.add_argument("--experiment", required=True, help="the experiment's name")
    command.add_argument("--algorithm", required=True,
                         help="the algorithm this job would configure, as YAML: 'tpe: {seed: null}'")
    command.add_argument("trial_command", nargs="+", metavar="-- python main.py ...",
                         help="the trial command given to `orion hunt`, priors included")

    reading = argparse.ArgumentParser(add_help=False, parents=[common])
    reading.add_argument("--experiment", default=os.environ.get("ORION_EXPERIMENT", "orion-example"),
                         help="the experiment's name (default: $ORION_EXPERIMENT, or orion-example)")
    command = subcommands.add_parser("summary", parents=[reading], help=summary.__doc__.split("\n")[0])
    command.set_defaults(run=summary)
    command = subcommands.add_parser("report", parents=[reading], help=report.__doc__.split("\n")[0])
    command.set_defaults(run=report)
    command.add_argument("--trials-dir", help="orion hunt's --working-dir (default: <database folder>/<experiment>)")
    command.add_argument("--output", help="the report's folder (default: <database folder>/<experiment>-report)")
    command.add_argument("--if-done", action="store_true",
                         help="only once all max_trials trials completed; before, print the summary only")

    # hunt: everything after it goes to `orion hunt` as it is (see `main`).
    subcommands.add_parser("hunt", help=hunt.__doc__.split("\n")[0] + " (takes what `orion hunt` takes)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # No torch in these processes: the trial, a process of its own, imports it. Oríon would
    # import it twice over, for nothing: in its CLI (see `hunt`) and when it looks up an
    # algorithm by name (it loads every algorithm's module, PB2's too, whose RNG helper
    # `orion.core.utils.random_state` saves torch's RNG state if it can import torch; TPE,
    # ASHA and random use numpy's). `None` here makes that import fail, as Oríon expects
    # where torch is not installed. Left alone where torch is already imported (the tests).
    sys.modules.setdefault("torch", None)
    install_database_lock()
    if argv[:1] == ["hunt"]:  # argparse would take `orion hunt`'s options as its own.
        return hunt(argv[1:])
    args = parse_args(argv)
    try:
        return args.run(args)
    except (ReportError, DatabaseLockError) as error:  # One line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
