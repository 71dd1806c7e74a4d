"""Database stress: N concurrent `orion hunt` workers on ONE PickledDB file, for each lock kind.

The README launches up to 50 workers (10 Slurm tasks x 5 per GPU) on one PickledDB file, the
ceiling Oríon itself states. Each row starts N workers at once, exactly as job.sh runs them:

    python -m orion_tools hunt -n db-stress --config CONFIG --working-dir DIR \\
        python tests/standin_trial.py --sleep S --record RUNS.jsonl --learning-rate~'loguniform(1e-5, 1.0)'

with ORION_DB_TYPE=pickleddb, ORION_DB_ADDRESS=<the row's own database file>, ORION_HEARTBEAT=30
and job.sh's configuration: its algorithm (--algorithm: TPE by default, n_initial_points = N,
at least 5, as job.sh sets it; or random search), its lock timeout (120 s), singleexecutor,
max_trials = trials per worker x N (at least 10). The trial is the light stand-in: it sleeps
--sleep seconds and reports an objective, so that the database, not the trials, is what is
loaded. Short trials (1 s, the default) make each worker come back to the database hundreds of
times more often than a real search; long ones (--sleep 180, longer than the heartbeat) make
heartbeats and the loss rule run, as in a real search. --stalls K SIGSTOPs K workers per row
(the worker and its trial: its process group, as a Slurm suspend does) for --stall-seconds
each, at random moments of the row: the one holding the database lock, if one is seen within
15 s, else a random one. Per row, from the database (orion.client, after the workers exit),
the stand-in's record of every run (tests/standin_trial.py --record: trial id, worker pid,
start, end), the database file read every 2 s during the row, each lock hold of every worker
(ORION_TOOLS_LOCK_TRACE) and each worker's output file (kept, with the database, when a row
has a problem):

- completed; lost (not completed nor broken at the end: new, reserved, interrupted...); run twice
  (a trial id with more than one run; `run_twice_at_once` in the JSON: two runs of one id
  overlapping); rolled back (a trial once completed in the file, later not); unreadable (a
  read of the file that failed); broken; lock timeouts (`stayed locked for`, the file lock, in
  the workers' output; the JSON also counts `DatabaseTimeout`); algo lock timeouts (a worker
  that died of `LockAcquisitionTimeout`); workers exiting non-zero (a worker that stops itself
  says why in an `error: ` line: `worker_errors` in the JSON). All of these but completed
  should be 0 (a worker that stopped itself, saying why, is not a problem).
- lock holds and waits, seconds: of the database lock (each operation) and of the algorithm
  lock (each suggestion and each result shown to the algorithm: TPE's grow with the trials;
  benchmarks/tpe_lock.py measures them by experiment size);
- trials/s: completed / wall (first worker started -> last worker exited); trials/s running:
  runs / (the first run's start -> the last run's end), without the workers' start and exit;
- wait p50/p99: the time a worker waits for a trial: per worker, its start -> its first run
  (first trial p50: importing Oríon on a loaded machine, then the lock), and each run's end ->
  its next run's start (between: Oríon's bookkeeping, the locks, starting the trial's process);
- RSS of the largest worker, PSS of all workers together (their trials not counted), sampled.

Oríon picks the lock from the database's filesystem (orion.core.io.database.pickleddb._create_lock):
FileLock (flock; filelock names it UnixFileLock) on ext2-4/GPFS/Lustre with flock, SoftFileLock
(a marker file, polled) on NFS, tmpfs and the rest. --db-roots names one folder per lock kind
(default: the temporary folder, ext4 here -> FileLock, and /dev/shm, tmpfs -> SoftFileLock);
each row prints the lock class Oríon creates there. Rows interleave the lock kinds, so that a
shared machine's load hits both alike.

Memory: a worker no longer imports torch (orion_tools `main`): about 145 MiB PSS each (it
was ~470 MiB when Oríon's CLI imported torch; RESULTS.md). A row starts only if its workers fit
in 80 % of MemAvailable (as measured in the rows before).

    uv run python benchmarks/db_stress.py [--quick] [--workers 1 10 25 50 100] [--trials-per-worker 4]
        [--sleep 1] [--algorithm tpe|random] [--stalls 2 --stall-seconds 60] [--db-roots /tmp /dev/shm]
        [--json FILE] [--markdown] [--keep]

The run with stalls (RESULTS.md, "Many workers with stalls"):

    uv run python benchmarks/db_stress.py --workers 10 50 100 --trials-per-worker 2 --sleep 180 \\
        --stalls 2 --stall-seconds 60 --json benchmarks/outputs/db_stress_stalls.json --markdown

Result (RESULTS.md, "Many workers with stalls"; 2 CPU cores, 2026-12-02): TPE, 3-minute
trials, 10, 50 and 100 workers, both lock kinds, two 60-s stalls per row (7 of the 12 on the
database lock's holder): every row completed its budget exactly, with no trial lost, run
twice, rolled back or unreadable, no lock timeout and every worker exiting 0. A stalled holder
made the others wait up to 64 s; the algorithm lock's p99 hold grew from 0.07-0.15 s (10
workers) to 2.3-2.7 s (100); a worker's first trial waited 3-4 min (p50) at 100 workers.
With 1-s trials and random search (2026-12-01), throughput peaked at 10 workers (2.2 trials/s
flock, 1.6 soft lock) and fell to 0.84-0.87 at 100 workers.
"""

import collections
import contextlib
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import common

import orion_tools  # After common: it puts the repo root on sys.path.
from orion.client import get_experiment
from orion.core.io.database.pickleddb import _create_lock

STANDIN_TRIAL = common.REPO_ROOT / "tests" / "standin_trial.py"
EXPERIMENT = "db-stress"
LOCK_TIMEOUT_MESSAGE = "stayed locked for"  # orion_tools' one-line DatabaseTimeout.
# The last line of the traceback of a worker that waited 60 s for the experiment's algorithm lock
# (a flag in the database, polled every second; Oríon's `Producer.observe` after every trial,
# not configurable) and died of it. (A worker that waits for it to *produce* a trial skips it.)
ALGORITHM_LOCK_TIMEOUT_LINE = "orion.storage.base.LockAcquisitionTimeout"
HEARTBEAT = 30  # job.sh's ORION_HEARTBEAT.
DEFAULT_WORKERS = [1, 10, 25, 50, 100]
QUICK_WORKERS = [1, 5]
# The folder of each lock kind: ext4 here (FileLock) and tmpfs (SoftFileLock).
DEFAULT_DB_ROOTS = [Path(tempfile.gettempdir()), Path("/dev/shm")]
# Until a row has been measured: the memory (PSS) of one hunt worker, MiB (torch-free).
WORKER_MIB_GUESS = 200
MEMORY_FRACTION = 0.8  # A row starts only if its workers' estimated memory fits in this share of MemAvailable.


def lock_class(db_path: Path) -> str:
    """The lock class Oríon creates for this database file: 'UnixFileLock' (filelock's FileLock) or 'SoftFileLock'."""
    return type(_create_lock(str(db_path) + ".lock")).__name__


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path` (ext4, tmpfs, nfs...), from /proc/mounts."""
    path = os.path.realpath(path)
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        _, mount, fstype, *_ = line.split()
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
            best = (mount, fstype)
    return best[1]


def algorithm_config(algorithm: str, n_workers: int) -> str:
    """job.sh's algorithm configuration, seeded: TPE's random phase lasts as many trials as workers (at least 5)."""
    if algorithm == "tpe":
        return f"tpe: {{seed: 1, n_initial_points: {max(n_workers, 5)}}}"
    return "random: {seed: 1}"


def write_config(folder: Path, budget: int, algorithm: str, n_workers: int, database: Path) -> Path:
    """job.sh's Oríon configuration (its lock timeout, executor and idle timeout)."""
    config = folder / "orion-config.yml"
    config.write_text(
        f"experiment:\n  algorithm:\n    {algorithm_config(algorithm, n_workers)}\n  max_trials: {budget}\n"
        # Oríon's LazyWorkers wait, far beyond the run: a spare worker exits at once anyway (orion_tools hunt).
        "worker:\n  executor: singleexecutor\n  idle_timeout: 1800\n"
        f"storage:\n  database:\n    type: pickleddb\n    host: {database}\n"
        f"    timeout: {orion_tools.DATABASE_LOCK_TIMEOUT}\n"
    )
    return config


@dataclass
class Worker:
    process: subprocess.Popen
    log: Path
    started: float  # time.time() just before it was started.
    ended: float | None = None  # When it was seen to have exited.
    returncode: int | None = None
    peak_rss_mib: float = 0.0


@dataclass
class Row:
    """One run of N workers on one database: where, and what happened."""

    folder: Path
    workers: list = field(default_factory=list)
    stalls: list = field(default_factory=list)
    watch: "DatabaseWatch" = field(default_factory=lambda: DatabaseWatch())

    @property
    def db(self) -> Path:
        return self.folder / "orion_db.pkl"

    @property
    def runs_file(self) -> Path:
        return self.folder / "runs.jsonl"

    @property
    def locks_file(self) -> Path:
        """Each lock hold of every worker (ORION_TOOLS_LOCK_TRACE)."""
        return self.folder / "locks.jsonl"


def start_workers(folder: Path, n_workers: int, budget: int, sleep: float, algorithm: str = "random") -> Row:
    """Starts `n_workers` `python -m orion_tools hunt` workers on folder/orion_db.pkl, as job.sh does."""
    row = Row(Path(folder))
    row.folder.mkdir(parents=True, exist_ok=True)
    config = write_config(row.folder, budget, algorithm, n_workers, row.db)
    env = common.child_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=row.db, ORION_HEARTBEAT=HEARTBEAT,
                           ORION_TOOLS_LOCK_TRACE=row.locks_file)
    # --working-dir as in job.sh: without it each worker makes a temporary folder for the
    # trials and deletes it when it exits, under the trials the other workers still run.
    command = [sys.executable, "-m", "orion_tools", "hunt", "-n", EXPERIMENT, "--config", str(config),
               "--working-dir", str(row.folder / "trials"),
               sys.executable, str(STANDIN_TRIAL), "--sleep", str(sleep), "--record", str(row.runs_file),
               "--learning-rate~loguniform(1e-5, 1.0)"]
    for i in range(n_workers):
        log = row.folder / f"worker-{i}.log"
        with open(log, "w") as output:  # Its own file, never an unread pipe.
            started = time.time()
            # Its own session: a worker left at the deadline is killed with its trial (its process group).
            process = subprocess.Popen(command, cwd=common.REPO_ROOT, env=env, stdout=output,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        row.workers.append(Worker(process, log, started))
    return row


def memory_of(pid: int) -> tuple:
    """(RSS, PSS) of a live process in MiB, from /proc/PID/smaps_rollup; (0, 0) once it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return values.get("Rss", 0.0), values.get("Pss", 0.0)


def kill_workers(workers: list) -> None:
    """SIGKILLs these workers' process groups (each worker and its trial), and waits for them."""
    for worker in workers:
        try:
            os.killpg(worker.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.process.wait()
        if worker.ended is None:
            worker.ended, worker.returncode = time.time(), worker.process.returncode


# --- Stalls --------------------------------------------------------------------------------------
# A stall: a worker's process group (the worker and its trial, as a Slurm suspend does; an NFS
# stall or swapping stops one process the same way) SIGSTOPped for a while, then SIGCONTinued.
# Each stall picks, at its moment, the worker holding the database lock if one does within
# HOLDER_SEARCH seconds (the dangerous case: a stale copy written back), else a random worker.
HOLDER_SEARCH = 15.0  # s


def database_lock_holder(db: Path, soft: bool) -> int | None:
    """The pid holding the database's lock now, if any: a soft lock's marker, or a flock's (/proc/locks)."""
    lock_file = Path(str(db) + ".lock")
    try:
        stat = lock_file.stat()
    except FileNotFoundError:
        return None
    if soft:
        try:
            fields = dict(line.split("=", 1) for line in lock_file.read_text().splitlines() if "=" in line)
        except OSError:
            return None
        return int(fields["pid"]) if fields.get("host") == socket.gethostname() and "pid" in fields else None
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()  # "1: FLOCK ADVISORY WRITE PID MAJOR:MINOR:INODE 0 EOF"; a waiter's: "1: -> FLOCK ..."
        if len(parts) >= 8 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(stat.st_ino):
            return int(parts[4])
    return None


@dataclass
class Stall:
    due: float  # time.time() at which it starts
    seconds: float
    pid: int | None = None
    holder: bool = False  # whether the worker held the database lock when stopped
    started: float | None = None
    ended: float | None = None


def plan_stalls(n: int, seconds: float, start: float, span: float, seed: int) -> list:
    """`n` stalls at random moments between 20 % and 80 % of `span` seconds after `start`."""
    rng = random.Random(seed)
    return sorted((Stall(start + rng.uniform(0.2, 0.8) * span, seconds) for _ in range(n)), key=lambda s: s.due)


def start_stall(stall: Stall, row: Row, live: list, rng: random.Random) -> None:
    pids = {worker.process.pid for worker in live}
    if not pids:
        return  # Every worker has exited: nothing to stall.
    soft = lock_class(row.db) == "SoftFileLock"  # Once, not in the 5-ms loop below.
    deadline = time.time() + HOLDER_SEARCH
    while time.time() < deadline:
        holder = database_lock_holder(row.db, soft)
        if holder in pids:
            stall.pid, stall.holder = holder, True
            break
        time.sleep(0.005)
    else:
        stall.pid = rng.choice(sorted(pids))
    try:
        os.killpg(stall.pid, signal.SIGSTOP)
        stall.started = time.time()
    except ProcessLookupError:
        stall.pid = None  # It ended meanwhile: the stall is tried again at the loop's next turn.


def end_stall(stall: Stall) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(stall.pid, signal.SIGCONT)
    stall.ended = time.time()


# --- Rollbacks --------------------------------------------------------------------------------------
# The database file is read every WATCH_EVERY seconds without its lock (each write renames a
# whole file over it: a read sees one version or the next): a completed trial that is no longer
# completed in a later version was rolled back (a stale copy written over it); a file that
# cannot be read was torn.
WATCH_EVERY = 2.0  # s


@dataclass
class DatabaseWatch:
    completed: set = field(default_factory=set)
    rolled_back: set = field(default_factory=set)
    unreadable: int = 0
    reads: int = 0

    def look(self, db: Path) -> None:
        try:
            with open(db, "rb") as file:
                database = pickle.load(file)
        except FileNotFoundError:
            return
        except Exception:
            self.unreadable += 1
            return
        self.reads += 1
        now = {document["_id"] for document in database.read("trials", {"status": "completed"})}
        self.rolled_back |= self.completed - now
        self.completed |= now


def wait_for_workers(row: Row, timeout: float, memory_every: float = 2.0) -> float:
    """Waits for every worker (killing those left after `timeout` s); returns the peak PSS of all, MiB.

    Interrupted (Ctrl-C, or SIGTERM: see `main`), it kills the workers left before it stops.
    """
    try:
        return _wait_for_workers(row, timeout, memory_every)
    except BaseException:
        kill_workers([worker for worker in row.workers if worker.ended is None])
        raise


def _wait_for_workers(row: Row, timeout: float, memory_every: float) -> float:
    deadline = time.time() + timeout
    peak_pss = 0.0
    next_sample = next_look = 0.0
    rng = random.Random(len(row.workers))
    while True:
        now = time.time()
        for stall in row.stalls:
            if stall.started is None and stall.pid is None and now >= stall.due:
                start_stall(stall, row, [w for w in row.workers if w.process.poll() is None], rng)
            elif stall.started is not None and stall.ended is None and now >= stall.started + stall.seconds:
                end_stall(stall)
        if now >= next_look:
            row.watch.look(row.db)
            next_look = now + WATCH_EVERY
        live = []
        for worker in row.workers:
            if worker.ended is None and worker.process.poll() is not None:
                worker.ended, worker.returncode = time.time(), worker.process.returncode
            if worker.ended is None:
                live.append(worker)
        if not live:
            for stall in row.stalls:
                if stall.started is not None and stall.ended is None:
                    end_stall(stall)
            row.watch.look(row.db)
            return peak_pss
        if time.time() >= next_sample:
            total = 0.0
            for worker in live:
                rss, pss = memory_of(worker.process.pid)
                worker.peak_rss_mib = max(worker.peak_rss_mib, rss)
                total += pss
            peak_pss = max(peak_pss, total)
            next_sample = time.time() + memory_every
        if time.time() >= deadline:
            print(f"  {len(live)} worker(s) still running after {timeout:.0f} s: killed", flush=True)
            kill_workers(live)
            return peak_pss
        time.sleep(0.2)


def read_runs(runs_file: Path) -> list:
    if not runs_file.exists():
        return []
    return [json.loads(line) for line in runs_file.read_text().splitlines() if line.strip()]


def percentile(values: list, q: float) -> float | None:
    """The q-th percentile (0-100) of `values`, interpolated linearly (numpy's default); None if empty."""
    values = sorted(values)
    if not values:
        return None
    position = (len(values) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def waits_of(row: Row, runs: list) -> tuple:
    """(every wait for a trial, every worker start -> its first run, every run's end -> the same
    worker's next run), seconds: see the docstring. The first list is the other two together."""
    started = {worker.process.pid: worker.started for worker in row.workers}
    by_worker = {}
    for run in runs:
        by_worker.setdefault(run["pid"], []).append(run)
    first, between = [], []
    for pid, worker_runs in by_worker.items():
        if pid not in started:
            continue  # Not one of our workers' (counted as `foreign runs`).
        worker_runs.sort(key=lambda run: run["start"])
        first.append(worker_runs[0]["start"] - started[pid])
        between += [after["start"] - before["end"] for before, after in zip(worker_runs, worker_runs[1:])]
    return first + between, first, between


def runs_twice(runs: list) -> tuple:
    """(trial ids run more than once, trial ids with two runs overlapping in time)."""
    by_trial = {}
    for run in runs:
        by_trial.setdefault(run["trial"], []).append(run)
    twice = [trial for trial, trial_runs in by_trial.items() if len(trial_runs) > 1]
    at_once = []
    for trial in twice:
        trial_runs = sorted(by_trial[trial], key=lambda run: run["start"])
        if any(after["start"] < before["end"] for before, after in zip(trial_runs, trial_runs[1:])):
            at_once.append(trial)
    return twice, at_once


def count_in_logs(row: Row, text: str) -> int:
    return sum(worker.log.read_text(errors="replace").count(text) for worker in row.workers)


def analyse(row: Row, budget: int, peak_pss_mib: float) -> dict:
    """The row's figures, from the database, the runs' records and the workers' output."""
    trials = get_experiment(EXPERIMENT, storage=orion_tools.storage(str(row.db))).fetch_trials()
    statuses = [trial.status for trial in trials]
    ids = {trial.id for trial in trials}
    runs = read_runs(row.runs_file)
    twice, at_once = runs_twice(runs)
    waits, first, between = waits_of(row, runs)
    completed = statuses.count("completed")
    first_start = min(worker.started for worker in row.workers)
    last_exit = max(worker.ended for worker in row.workers)
    wall = last_exit - first_start
    # Without the workers' start-up and exit: the first run's start -> the last run's end.
    running = max((run["end"] for run in runs), default=0) - min((run["start"] for run in runs), default=0)
    pids = {worker.process.pid for worker in row.workers}
    holds = read_runs(row.locks_file)  # One JSON line per lock hold (ORION_TOOLS_LOCK_TRACE).

    def lock_figures(kind: str) -> dict:
        mine = [hold for hold in holds if hold["lock"] == kind]
        held, waited = [hold["held"] for hold in mine], [hold["waited"] for hold in mine]
        return {f"{kind}_lock_holds": len(mine), f"{kind}_hold_p50": percentile(held, 50),
                f"{kind}_hold_p99": percentile(held, 99), f"{kind}_hold_max": max(held, default=None),
                f"{kind}_wait_p50": percentile(waited, 50), f"{kind}_wait_p99": percentile(waited, 99),
                f"{kind}_wait_max": max(waited, default=None)}
    # A worker that stops itself says why in one `error: ` line (a stall made its hold unsafe...).
    errors_of = [[line for line in worker.log.read_text(errors="replace").splitlines() if line.startswith("error: ")]
                 for worker in row.workers]
    return {
        **lock_figures("database"), **lock_figures("algorithm"),
        "stalls": [{"pid": stall.pid, "held_database_lock": stall.holder, "seconds": stall.seconds,
                    "started": stall.started, "ended": stall.ended} for stall in row.stalls],
        "stalls_done": sum(stall.started is not None and stall.ended is not None for stall in row.stalls),
        "stalls_of_lock_holders": sum(stall.holder for stall in row.stalls),
        "rolled_back": len(row.watch.rolled_back),
        "database_unreadable": row.watch.unreadable,
        "database_reads": row.watch.reads,
        "worker_errors": collections.Counter(line[:160] for errors in errors_of for line in errors),
        "workers": len(row.workers),
        "budget": budget,
        "trials": len(trials),
        "completed": completed,
        "lost": sum(status not in ("completed", "broken") for status in statuses),
        "statuses": {status: statuses.count(status) for status in sorted(set(statuses))},
        "run_twice": len(twice),
        "run_twice_at_once": len(at_once),
        "run_twice_ids": twice,
        "runs": len(runs),
        "runs_of_unknown_trials": sum(run["trial"] not in ids for run in runs),
        "foreign_runs": sum(run["pid"] not in pids for run in runs),  # getppid() not one of our workers.
        "completed_without_run": sum(trial.status == "completed" and trial.id not in {r["trial"] for r in runs}
                                     for trial in trials),
        "broken": statuses.count("broken"),
        "lock_timeouts": count_in_logs(row, LOCK_TIMEOUT_MESSAGE),
        "database_timeout_mentions": count_in_logs(row, "DatabaseTimeout"),
        "algorithm_lock_timeouts": count_in_logs(row, ALGORITHM_LOCK_TIMEOUT_LINE),
        "tracebacks": count_in_logs(row, "Traceback (most recent call last)"),
        "workers_nonzero": sum(worker.returncode != 0 for worker in row.workers),
        "workers_nonzero_unexplained": sum(worker.returncode != 0 and not errors
                                           for worker, errors in zip(row.workers, errors_of)),
        "exit_codes": sorted({worker.returncode for worker in row.workers}),
        "trials_per_second": completed / wall if wall > 0 else None,
        "running_trials_per_second": len(runs) / running if running > 0 else None,
        "wait_p50": percentile(waits, 50),
        "wait_p99": percentile(waits, 99),
        "wait_max": max(waits, default=None),
        "first_trial_p50": percentile(first, 50),
        "between_p50": percentile(between, 50),
        "between_p99": percentile(between, 99),
        "wall_seconds": wall,
        "peak_worker_rss_mib": max(worker.peak_rss_mib for worker in row.workers),
        "peak_workers_pss_mib": peak_pss_mib,
        "db_bytes": row.db.stat().st_size if row.db.exists() else None,
    }


def run_row(folder: Path, n_workers: int, trials_per_worker: int, sleep: float, timeout: float,
            min_budget: int = 10, algorithm: str = "random", stalls: int = 0, stall_seconds: float = 60.0,
            seed: int = 0) -> dict:
    """Runs one row in `folder` (which must not hold a previous row) and returns its figures.

    With `stalls`, that many workers are SIGSTOPped for `stall_seconds` each, at random moments
    of the row's expected run (trials_per_worker x sleep)."""
    budget = max(min_budget, trials_per_worker * n_workers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_class(folder / "orion_db.pkl")
    load_before = os.getloadavg()[0]
    row = start_workers(folder, n_workers, budget, sleep, algorithm)
    row.stalls = plan_stalls(stalls, stall_seconds, time.time(), trials_per_worker * sleep, seed + n_workers)
    peak_pss = wait_for_workers(row, timeout)
    result = analyse(row, budget, peak_pss)
    result.update(lock=lock, filesystem=filesystem_type(folder), folder=str(folder), sleep=sleep,
                  algorithm=algorithm, load_before=load_before, load_after=os.getloadavg()[0])
    return result


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

COLUMNS = ["lock (filesystem)", "algorithm", "workers", "budget", "completed", "lost", "run twice", "rolled back",
           "unreadable", "broken", "stalls (lock holders)", "lock timeouts", "algo lock timeouts", "exit != 0",
           "db hold p99/max s", "algo hold p50/p99/max s", "algo wait p99 s", "trials/s", "trials/s running",
           "wait p50 s", "wait p99 s", "between p50 s", "between p99 s", "first trial p50 s", "wall s",
           "RSS/worker MiB", "PSS all GiB"]


def slash(*values) -> str:
    return "/".join(common.fmt(value) for value in values)


def table_row(r: dict) -> list:
    return [f"{r['lock']} ({r['filesystem']})", r.get("algorithm", "random"), r["workers"], r["budget"],
            r["completed"], r["lost"], r["run_twice"], r.get("rolled_back", "-"), r.get("database_unreadable", "-"),
            r["broken"], f"{r.get('stalls_done', 0)} ({r.get('stalls_of_lock_holders', 0)})", r["lock_timeouts"],
            r.get("algorithm_lock_timeouts", "-"), r["workers_nonzero"],
            slash(r.get("database_hold_p99"), r.get("database_hold_max")),
            slash(r.get("algorithm_hold_p50"), r.get("algorithm_hold_p99"), r.get("algorithm_hold_max")),
            r.get("algorithm_wait_p99"), r["trials_per_second"],
            r["running_trials_per_second"], r["wait_p50"], r["wait_p99"], r["between_p50"], r["between_p99"],
            r["first_trial_p50"], common.fmt(r["wall_seconds"], 1),
            common.fmt(r["peak_worker_rss_mib"], 0), r["peak_workers_pss_mib"] / 1024]


def problems(r: dict) -> list:
    """What went wrong in a row (empty: nothing)."""
    checks = [("completed", f"{r['completed']} of {r['budget']}" if r["completed"] != r["budget"] else 0),
              ("lost", r["lost"]),
              ("run twice", r["run_twice"]), ("rolled back", r.get("rolled_back")),
              ("database unreadable", r.get("database_unreadable")),
              ("broken", r["broken"]), ("lock timeouts", r["lock_timeouts"]),
              ("DatabaseTimeout", r["database_timeout_mentions"]),
              ("algorithm lock timeouts", r.get("algorithm_lock_timeouts")), ("workers exit != 0 without saying why", r["workers_nonzero_unexplained"]),
              ("tracebacks", r["tracebacks"]), ("runs by unknown pids", r["foreign_runs"])]
    return [f"{name}: {value}" for name, value in checks if value]


def saturation(rows: list) -> list:
    """Per lock kind: where trials/s stops growing with the workers (< 10 % more for more workers)."""
    notes = []
    for lock in dict.fromkeys(r["lock"] for r in rows):
        mine = sorted((r for r in rows if r["lock"] == lock and r["trials_per_second"]), key=lambda r: r["workers"])
        if len(mine) < 2:
            continue
        best = max(mine, key=lambda r: r["trials_per_second"])
        last_growth = next((before for before, after in zip(mine, mine[1:])
                            if after["trials_per_second"] < 1.1 * before["trials_per_second"]), None)
        curve = ", ".join(f"{r['workers']}: {r['trials_per_second']:.2f}" for r in mine)
        where = (f"no more than +10 % past {last_growth['workers']} workers" if last_growth
                 else "still growing at the last row")
        notes.append(f"{lock}: trials/s by workers {curve}; {where}; peak {best['trials_per_second']:.2f} "
                     f"trials/s at {best['workers']} workers (without any overhead: workers / sleep)")
    return notes


def markdown(rows: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(common.fmt(c) for c in table_row(r)) + " |" for r in rows]
    return "\n".join(lines)


def orion_tools_version() -> dict:
    """Which orion_tools ran: the hash of its modules, the commit, and `git diff --stat orion_tools`."""
    digest = hashlib.sha256()
    for path in sorted((common.REPO_ROOT / "orion_tools").glob("*.py")):
        digest.update(path.read_bytes())

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=common.REPO_ROOT, capture_output=True, text=True,
                                  timeout=60).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
    return {"sha256": digest.hexdigest(), "commit": git("rev-parse", "HEAD"),
            "diff_stat": git("diff", "--stat", "orion_tools")}


def lock_timeout() -> str:
    """storage.database.timeout as orion_tools.storage() sets it (else Oríon's default, 60 s). Not
    the workers': `orion hunt` takes its storage from its configuration and ORION_DB_* variables."""
    timeout = orion_tools.storage("orion_db.pkl")["database"].get("timeout")
    return f"{timeout} s" if timeout is not None else "Oríon's default, 60 s"


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--workers", type=int, nargs="+", help=f"concurrent workers of each row "
                        f"(default {' '.join(map(str, DEFAULT_WORKERS))}; --quick: {' '.join(map(str, QUICK_WORKERS))})")
    parser.add_argument("--trials-per-worker", type=int, default=None,
                        help="budget = this x workers, at least 10 (default 4; --quick: 2)")
    parser.add_argument("--sleep", type=float, default=1.0, help="seconds each stand-in trial sleeps (default 1)")
    parser.add_argument("--algorithm", choices=["tpe", "random"], default="tpe",
                        help="job.sh's TPE (the default; n_initial_points = workers, at least 5) or random search")
    parser.add_argument("--stalls", type=int, default=0,
                        help="workers SIGSTOPped per row, each for --stall-seconds, at random moments (default 0)")
    parser.add_argument("--stall-seconds", type=float, default=60.0, help="length of each stall (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="for the stalls' moments")
    parser.add_argument("--db-roots", type=Path, nargs="+", default=DEFAULT_DB_ROOTS,
                        help="one folder per lock kind, for the databases (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--markdown", action="store_true", help="also print the table in markdown")
    parser.add_argument("--keep", action="store_true", help="keep each row's folder (database, logs, runs)")
    parser.set_defaults(timeout=1800)  # common's --timeout: here, seconds allowed to each row.
    args = parser.parse_args()
    if (args.workers and min(args.workers) < 1) or (args.trials_per_worker is not None and args.trials_per_worker < 1):
        parser.error("--workers and --trials-per-worker must be at least 1")
    if args.sleep < 0 or args.stalls < 0 or args.stall_seconds <= 0:
        parser.error("--sleep and --stalls must be at least 0, --stall-seconds more than 0")
    signal.signal(signal.SIGTERM, interrupted)  # Stops as Ctrl-C does: the workers are killed too.
    workers = args.workers or (QUICK_WORKERS if args.quick else DEFAULT_WORKERS)
    trials_per_worker = args.trials_per_worker or (2 if args.quick else 4)

    common.print_header("Database stress: concurrent orion hunt workers on one PickledDB file", args)
    version = orion_tools_version()
    print(f"orion_tools: sha256 {version['sha256'][:12]}, commit {(version['commit'] or '?')[:12]}, "
          f"uncommitted changes: {version['diff_stat'] or 'none'}", flush=True)
    print(f"memory available: {mem_available_mib():,.0f} MiB", flush=True)

    folders = []
    for root in args.db_roots:
        folder = Path(tempfile.mkdtemp(prefix="db-stress-", dir=root))
        folders.append(folder)
        print(f"databases in {folder}: {filesystem_type(folder)} -> Oríon's lock: {lock_class(folder / 'x.pkl')}",
              flush=True)
    rows, skipped, worker_mib = [], [], WORKER_MIB_GUESS
    started = time.time()
    try:
        for n in workers:
            for folder in folders:
                needed, available = n * worker_mib, mem_available_mib()
                if needed > MEMORY_FRACTION * available:
                    skip = (f"{n} workers, {lock_class(folder / 'x.pkl')}: skipped: ~{needed:,.0f} MiB needed "
                            f"({worker_mib:.0f} MiB per worker, as measured), {available:,.0f} MiB available")
                    print(skip, flush=True)
                    skipped.append(skip)
                    continue
                print(f"{n} worker(s), {lock_class(folder / 'x.pkl')} ({filesystem_type(folder)}), "
                      f"budget {max(10, trials_per_worker * n)} ...", flush=True)
                result = run_row(folder / f"{n}-workers", n, trials_per_worker, args.sleep, args.timeout,
                                 algorithm=args.algorithm, stalls=args.stalls, stall_seconds=args.stall_seconds,
                                 seed=args.seed)
                rows.append(result)
                if result["peak_workers_pss_mib"]:  # Sampled: may miss the peak; never below half the guess.
                    worker_mib = max(WORKER_MIB_GUESS / 2, result["peak_workers_pss_mib"] / n)
                print(f"  {result['completed']}/{result['budget']} completed in {result['wall_seconds']:.1f} s, "
                      f"{common.fmt(result['trials_per_second'])} trials/s, wait p50 {common.fmt(result['wait_p50'])} s "
                      f"p99 {common.fmt(result['wait_p99'])} s; load {result['load_before']:.1f} -> "
                      f"{result['load_after']:.1f}; problems: {', '.join(problems(result)) or 'none'}", flush=True)
                if problems(result):
                    print(f"  see the workers' output in {folder / f'{n}-workers'} (kept)", flush=True)
                    args.keep = True
    finally:
        if not args.keep:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
    elapsed = time.time() - started

    notes = [
        f"{args.algorithm}; sleep {args.sleep} s per trial; budget {trials_per_worker} trials per worker (at least "
        f"10); ORION_HEARTBEAT={HEARTBEAT}; lock timeout {orion_tools.DATABASE_LOCK_TIMEOUT} s (job.sh's); "
        f"stalls per row: {args.stalls} of {args.stall_seconds:.0f} s (a worker's process group SIGSTOPped: the "
        "database lock's holder if one is found within 15 s, else a random worker)",
        "rolled back: a trial seen completed in the database file, later not; unreadable: a read of the file "
        "that failed (read every 2 s without the lock); holds and waits: every lock hold of every worker "
        "(ORION_TOOLS_LOCK_TRACE), seconds",
        "lost: not completed nor broken at the end; run twice: a trial id run more than once (stand-in records)",
        "wait: per worker, its start -> its first run (first trial) and each run's end -> its next run's start "
        "(between); trials/s running: runs / (first run's start -> last run's end)",
        "RSS/worker: the largest worker's peak (sampled every 2 s); PSS all: all workers together, their trials not counted",
        *saturation(rows),
        *skipped,
        f"all rows: {elapsed:.0f} s",
    ]
    common.print_table("Database stress", COLUMNS, [table_row(r) for r in rows], notes)
    bad = [f"{r['workers']} workers, {r['lock']}: {', '.join(problems(r))}" for r in rows if problems(r)]
    print("problems: " + ("; ".join(bad) if bad else "none"), flush=True)
    if args.markdown:
        print()
        print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps({
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "host": socket.gethostname(),
            "machine": f"{common.cpu_model()}, {common.cpu_count()} CPUs", "sleep": args.sleep,
            "trials_per_worker": trials_per_worker, "heartbeat": HEARTBEAT, "orion_tools": version,
            "algorithm": args.algorithm, "stalls": args.stalls, "stall_seconds": args.stall_seconds,
            "lock_timeout": lock_timeout(), "seconds": elapsed, "rows": rows, "skipped": skipped,
        }, indent=1))
        print(f"wrote {args.json}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
