"""The database: the lock every process takes on the PickledDB file (a kernel lock where the
filesystem has flock, else a lease its holder renews), writes fenced by that lock, the lock's
trace, whole-file writes, and the experiment opened read-only. Every other module builds on this
one; it imports none of them.
"""

import collections
import contextlib
import errno
import functools
import json
import os
import pickle
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path


import orion.core
import orion.core.io.database.pickleddb
from filelock import LeaseSettingsMismatch, SoftFileLease, SoftFileLock, Timeout
from orion.core.io.database import DatabaseTimeout
from orion.core.io.database.ephemeraldb import EphemeralDB
from orion.core.utils.exceptions import NoConfigurationError

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
# lock (docs/many-workers.md):
# - A lease (filelock's SoftFileLease): the marker carries a unique token, and its holder renews
#   it (touches it) every DATABASE_LOCK_LEASE / 10 s while it holds the lock, so a live holder
#   keeps it however long it holds. Another process takes the marker over once it has seen it
#   unchanged for DATABASE_LOCK_LEASE seconds by its own clock (a clock ahead of the file
#   server's cannot shorten that). A marker of another kind (a plain `orion` command's)
#   unchanged that long is broken too.
# - Fencing: each writer writes its own temporary file (host, pid and thread in its name) and
#   renames it over the database only if, right before the rename, the marker is still its own
#   (the same file) and was renewed less than half a lease ago: a takeover needs a whole lease
#   of silence. Otherwise it deletes its file, writes nothing, and tries again (DatabaseLockLost).
#   A stall between that check and the rename is fenced by the generations (below).
# - The lease, 90 s, is a hundred times the longest normal hold (2-10 ms up to 500 trials,
#   0.2-0.8 s at 5,000 trials): only a stall lasts that long. A holder stalled for more than
#   half of it writes nothing and tries again; one stalled less goes on. No other timing depends
#   on it: a marker left by a worker killed on another node pauses the database for a lease, and
#   the workers wait (their trials run on; see heartbeat.py).
# Every process on one database must use the same lease (filelock refuses another):
# ORION_TOOLS_LOCK_LEASE, seconds, exists for the tests, which cannot wait 90 s.
DATABASE_LOCK_LEASE = float(os.environ.get("ORION_TOOLS_LOCK_LEASE", 90))  # s
# How long a process waits for the lock before Oríon's DatabaseTimeout. (Oríon's default is 60
# s; job.sh puts this value in the workers' configuration, `storage.database.timeout`.) Above
# the lease, so that a marker left by a killed worker is broken before anyone gives up.
DATABASE_LOCK_TIMEOUT = 120  # s
LOCK_POLL = 1.0  # s between two looks at a marker that filelock does not break.
LOCK_WAIT = threading.local()  # .unless_signalled: a pending SIGTERM ends this thread's wait (budget.py).

ORIONS_CREATE_LOCK = orion.core.io.database.pickleddb._create_lock  # Oríon's choice of lock kind (not replaced).
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
                raise FileNotFoundError()
            os.utime(self.fd)  # Contenders time the lease from this change.
            self.renewed = before
        except FileNotFoundError:  # Stalled right after filelock took it, and taken over (and maybe released).
            self.release()
            raise DatabaseLockLost(f"the lock {self.path} was taken over as soon as this process got it") from None
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
                + ": it wrote nothing")

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


# --- Writes that cannot apply after a takeover: one generation, one writer -----------------------
# The lease keeps a stalled holder from writing back what it read before its stall, but only up
# to the last look (check()) before the rename: a holder stalled between that look and the rename
# (for any length) renamed a stale copy over newer ones. So the database carries a generation
# number (an attribute of Oríon's EphemeralDB, pickled with it; plain Oríon ignores it), and a
# writer that read generation N commits N + 1 by creating the symlink `<database>.generations/N+1`
# (pointing at its temporary file) before its rename. Creating a name is atomic and exclusive on
# every filesystem, NFS included: of two writers that read N (a stalled one and the one that took
# the lock over), one commits and the other finds N + 1 taken, writes nothing and tries again on
# what is there now (DatabaseLockLost, retried by `patiently`). A committed write whose rename has
# not happened yet (its writer stalled, or died, right after the claim) is finished by the next
# process that reads the database: it renames the claimed file into place itself, and the late
# writer's own rename then finds nothing to rename. Nothing is rolled back, whatever the stall.
# The claims are kept (a writer stalled for days must still find its generation taken), each an
# empty file once its write is applied: one per write (docs/many-workers.md).
GENERATION = "_orion_tools_generation"


def generations_dir(path: str) -> str:
    return f"{path}.generations"


def read_database(path: str):
    """Oríon's `PickledDB._get_database`: the database file, unpickled (empty if missing or empty)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        data = b""
    return pickle.loads(data) if data else EphemeralDB()


def newest_database(path: str):
    """The database's newest committed content and generation: the file, rolled forward past a write
    that claimed the next generation and was stalled (or died) before its rename."""
    while True:
        database = read_database(path)
        generation = getattr(database, GENERATION, 0)
        claim = os.path.join(generations_dir(path), str(generation + 1))
        try:
            claimed = os.readlink(claim)
        except FileNotFoundError:
            return database, generation
        except OSError:  # A plain file: that write was applied, so the file read is older than it.
            if getattr(read_database(path), GENERATION, 0) > generation:
                continue  # Read just before that write's rename.
            # An older copy put back on purpose (check-database's .bak, by hand): its next generations
            # are taken; it goes on after them.
            while os.path.lexists(os.path.join(generations_dir(path), str(generation + 1))):
                generation += 1
            setattr(database, GENERATION, generation)
            return database, generation
        try:
            os.rename(os.path.join(os.path.dirname(path), claimed), path)
        except FileNotFoundError:  # Its writer (or another reader) renamed it meanwhile.
            if getattr(read_database(path), GENERATION, 0) <= generation:
                raise DatabaseLockError(
                    f"the Oríon database {path} lost its committed write {generation + 1} ({claimed} is gone; was "
                    f"the folder edited?): restore {path}.bak (job.sh's check-database keeps it)") from None
        applied(claim)


def applied(claim: str) -> None:
    """Replaces a claim's symlink, once its write is applied, by an empty file of the same name: the
    name never stops existing (it stays taken), and no link is left pointing at nothing (`cp -r`,
    `shutil.copytree` and backup tools trip on those)."""
    temporary = temporary_path(claim)
    with contextlib.suppress(OSError):  # Left as a link, it still works: readers find its write applied.
        open(temporary, "w").close()
        os.rename(temporary, claim)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)


def commit(database, path: str, generation: int, lock) -> None:
    """Writes `database` as generation + 1, unless another process has written that generation."""
    setattr(database, GENERATION, generation + 1)
    temporary = temporary_path(path)
    try:
        with open(temporary, "wb") as file:
            pickle.dump(database, file)
        lock.check()
        os.makedirs(generations_dir(path), exist_ok=True)
        os.symlink(os.path.basename(temporary), os.path.join(generations_dir(path), str(generation + 1)))
    except FileExistsError:
        os.unlink(temporary)
        raise DatabaseLockLost(f"another process wrote the Oríon database {path} while this one held its lock "
                               "(this one was stalled): it wrote nothing") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # Committed: from here on, the write counts, whether this rename happens or another process's.
    test_pause("before-rename")
    try:
        os.rename(temporary, path)
    except FileNotFoundError:  # Another process found it claimed and renamed it for us.
        return
    except OSError as error:  # Read-only now, say: the next process to read the database renames it.
        print(f"warning: {path}: {error.strerror}: this write is kept as {temporary} and applied by the next "
              "reader", file=sys.stderr, flush=True)
        return
    applied(os.path.join(generations_dir(path), str(generation + 1)))


# ORION_TOOLS_TEST_PAUSE=POINT[:N], for the fault tests only: the N-th time (default 1) this
# process reaches POINT, it stops itself (SIGSTOP), as a suspended job or a stalled file server
# would stop it there; the test chooses how long, then continues it (SIGCONT) or kills it.
# Points: holding-database, before-rename, holding-algorithm, in-observe, trial-ended (its result
# not recorded yet).
TEST_PAUSE = os.environ.get("ORION_TOOLS_TEST_PAUSE", "")
TEST_PAUSE_COUNT: collections.Counter = collections.Counter()


def test_pause(point: str) -> None:
    if not TEST_PAUSE:
        return
    name, _, nth = TEST_PAUSE.partition(":")
    if name == point:
        TEST_PAUSE_COUNT[point] += 1
        if TEST_PAUSE_COUNT[point] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGSTOP)


@contextlib.contextmanager
def fenced_locked_database(self, write=True):
    """Oríon's `PickledDB.locked_database`, with database_lock() and fenced writes (above)."""
    lock = database_lock(self.host + ".lock")
    asked = time.monotonic()
    try:
        lock.acquire(timeout=self.timeout)
    except Timeout as error:
        # One line, not Oríon's 20 (TIMEOUT_ERROR_MESSAGE).
        raise DatabaseTimeout(f"the Oríon database {self.host} stayed locked for {self.timeout:.1f} s: too many "
                              "workers on one database, or a stalled file server? (docs/many-workers.md)") from error
    taken = time.monotonic()
    try:
        test_pause("holding-database")
        database, generation = newest_database(self.host)
        yield database
        if write:
            commit(database, self.host, generation, lock)
    finally:
        lock.release()
        trace_lock("database", taken - asked, time.monotonic() - taken)


# --- Every database operation, patient ---------------------------------------------------------
# What a worker must wait out rather than die of, with a traceback and the finished trial's
# result lost: a write that lost its lease or its generation (above: nothing was written, so it is
# tried again on the database as it is now), and a filesystem that is full, over quota, read-only
# or stale for a while (a worker then waits, says so once, and goes on when it is writable again:
# a finished trial's result waits in memory). In a worker (`hunt`: PATIENT), a DatabaseTimeout is
# waited out too: a trial is never abandoned because someone else holds the lock.
OUTAGES = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ESTALE, errno.EIO}
OUTAGE_POLL = 2.0  # s
PATIENT = threading.Event()
OUTAGE_SAID = threading.Lock()  # The threads of one process say a wait once, not once each.
OUTAGE_WAITERS = [0]
# Set (under OUTAGE_SAID) once a worker has said why it exits (heartbeat.py, `stop_worker`): a
# thread still waiting out an outage says nothing more, so that the error stays the last line.
LAST_LINE_SAID = threading.Event()


def outage_begins(what: str, why: str) -> None:
    with OUTAGE_SAID:
        OUTAGE_WAITERS[0] += 1
        if OUTAGE_WAITERS[0] == 1 and not LAST_LINE_SAID.is_set():
            print(f"warning: {what} cannot be used ({why}): waiting until it can; nothing is lost meanwhile",
                  file=sys.stderr, flush=True)


def outage_ends(what: str, seconds: float) -> None:
    with OUTAGE_SAID:
        OUTAGE_WAITERS[0] -= 1
        if OUTAGE_WAITERS[0] == 0 and not LAST_LINE_SAID.is_set():
            print(f"{what[0].upper()}{what[1:]} is usable again, after {seconds:.0f} s", file=sys.stderr, flush=True)


def waiting_out_outages(action, what: str):
    """`action()`, tried again every OUTAGE_POLL s while it fails for a full, read-only or stale
    filesystem (one warning line): for the files a worker writes beside the database."""
    since = None
    try:
        while True:
            try:
                return action()
            except OSError as error:
                if error.errno not in OUTAGES:
                    raise
                if since is None:
                    since = time.monotonic()
                    outage_begins(what, os.strerror(error.errno))
                time.sleep(OUTAGE_POLL)
    finally:
        if since is not None:
            outage_ends(what, time.monotonic() - since)


def patiently(operation):
    """A PickledDB operation, retried as described above."""
    @functools.wraps(operation)
    def run(self, *args, **kwargs):
        waiting = None  # (since, why) while the database cannot be written
        try:
            while True:
                try:
                    return operation(self, *args, **kwargs)
                except DatabaseLockLost as lost:
                    print(f"warning: {lost}; trying again", file=sys.stderr, flush=True)
                    why = None
                except OSError as error:
                    if error.errno not in OUTAGES:
                        raise
                    why = f"{os.strerror(error.errno)}"
                except DatabaseTimeout as error:
                    if not PATIENT.is_set():
                        raise
                    why = str(error)
                if why is not None:
                    if waiting is None:
                        waiting = (time.monotonic(), why)
                        outage_begins(f"the Oríon database {self.host}", why)
                    time.sleep(OUTAGE_POLL)
        finally:
            if waiting is not None:
                outage_ends(f"the Oríon database {self.host}", time.monotonic() - waiting[0])
    run.__module__ = __name__  # Oríon's name and docstring, but this module's (docs/orion-patches.md).
    return run


PICKLEDDB_OPERATIONS = ["ensure_index", "index_information", "drop_index", "write", "read", "read_and_write",
                        "count", "remove"]


def storage(database: str) -> dict:
    """Oríon's storage configuration for a PickledDB file."""
    return {"type": "legacy",
            "database": {"type": "pickleddb", "host": database, "timeout": DATABASE_LOCK_TIMEOUT}}


# --- Whole files and the experiment, read-only: for the records, checks and report -----------------


def write_whole(path: Path, text: str) -> None:
    """Writes `path` through a temporary name of its own, then renames it: a reader, or another
    worker, never sees half of it."""
    temporary = temporary_path(path.with_name(f".{path.name}"))  # Hidden: `ls` shows whole files only.

    def write() -> None:
        try:
            Path(temporary).write_text(text)
            os.replace(temporary, path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
    waiting_out_outages(write, f"the folder of {path}")


class ReportError(Exception):
    """The experiment cannot be read or holds no trial: one line for the user, exit 1."""


def open_experiment(args):
    """The experiment, read-only, and its trials; ReportError if it is missing or broken."""
    from orion.client import get_experiment  # Here: the checks import this module, not Oríon's client.
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
