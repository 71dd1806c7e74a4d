"""Chaos: randomized faults against real `python -m orion_tools hunt` workers, and the checker of
what each such search leaves (issue 24). tests/test_chaos.py runs a reduced series and tests the
checker on crafted bad searches; benchmarks/chaos.py runs the long series.

A search (`run_search`): W workers started as job.sh starts them (`python -m orion_tools hunt
--worker-records DIR -n chaos --config CFG --working-dir DIR python tests/standin_trial.py
--sleep~uniform(2, 6) --record RUNS ...`: each trial's length a prior, since Oríon wants one
command line per experiment), each in its own session (a group SIGSTOP or SIGKILL covers its
trial) and, where `unshare` works, under a host name of its own (`node-K`: a SIGKILLed lease
holder's marker is then broken by the lease only, as on a cluster). The database lives on a
small tmpfs that the harness mounts (root), so that Oríon uses its soft lock (orion_tools'
lease) and the filesystem can be filled or made read-only; without root, in a folder of
/dev/shm, without filesystem faults. The trials' folders live elsewhere. Timings are scaled
down so that a search takes 0.5-3 minutes (`Timings`): ORION_HEARTBEAT=2 (a trial is lost after
10 s), lease 4 s, algorithm-lock takeover 6 s, database lock wait 8 s.

Faults (`plan_search`), drawn from the seed alone: kind, start (seconds after the first worker
starts), duration, and the rule that picks the target when the fault starts:

- kill: a worker's process group SIGKILLed (worker and trial), a replacement started 0-5 s later;
- stop: a worker's process group SIGSTOPped for 0.5 s to max_stall (log-uniform), then SIGCONT;
- full: the database's filesystem filled (one file of all its free space), then freed;
- read-only: the database's folder made read-only (a read-only bind mount over it: EROFS for every
  new operation, as a filesystem remounted read-only), then writable again (both 0.5 s to
  max_filesystem, log-uniform);
- slow-hold: a worker stopped inside a hold: with orion_tools' test hook
  (ORION_TOOLS_TEST_PAUSE=POINT:N: the worker SIGSTOPs itself the N-th time it reaches POINT,
  one of `PAUSE_POINTS`), the worker chosen at plan time is started with it, held stopped for the
  drawn duration once it stops, then resumed (SIGCONT) or killed and replaced; without the hook,
  the current holder of the lock the point is in (database: holding-database, before-rename;
  algorithm: holding-algorithm, in-observe), found by looking (below), is stopped or killed.

Targets of kill and stop: "worker #k" (the k-th live worker not under a fault, k modulo their
number), "the database-lock holder" (the pid its marker orion_db.pkl.lock names, else the
worker with a descriptor open on it; polled every 5 ms), or "the algorithm-lock holder" (the
algorithm document `locked` while exactly one worker runs no trial, or of several exactly one
is on a CPU: the file read each time it changes); a holder not seen within HOLDER_SEARCH falls
back to worker #k. Which process a rule picks depends on the run's timing; the rules, starts
and durations do not. Each fault's record says whether its holder was "confirmed" (still
holding once stopped).

The checker (`check`, over what a search left, and `DatabaseWatch`, which reads the database
file every 0.2 s during the search): the budget exact (never more trials than max_trials), or
else a visible failure (a worker that exited non-zero with an `error:` line); no rollback ever
(a completed or broken trial seen later with another status or result, or gone); no trial run
to its end twice (the stand-in's --record); nothing completed lost (a run to its end whose trial
is not completed at the end; a completed trial without its objective, or with another than the
stand-in's); nothing left reserved; no broken trial (the stand-in never fails); every worker:
exit 0 without an `error:` line, or non-zero with an `error:` last line, no traceback anywhere,
not killed by a signal the harness did not send, nothing of its process group (a trial) left
running after it; its --worker-records consistent with the database, and job.sh's verdict
(`orion_tools job-verdict`) consistent with its exit. Each violation is one string.
"""

import contextlib
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from argparse import Namespace
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
STANDIN_TRIAL = REPO_ROOT / "tests" / "standin_trial.py"
EXPERIMENT = "chaos"
KINDS = ("kill", "stop", "full", "read-only", "slow-hold")
KIND_WEIGHTS = (2, 4, 1, 1, 2)
PAUSE_POINTS = ("holding-database", "before-rename", "holding-algorithm", "in-observe")
RULES = ("worker", "database-lock holder", "algorithm-lock holder")
RULE_WEIGHTS = (2, 2, 1)
PAUSE_VARIABLE = "ORION_TOOLS_TEST_PAUSE"
HOLDER_SEARCH = 10.0  # s: how long a fault looks for a lock holder before it falls back to worker #k.
WATCH_EVERY = 0.2  # s between two looks at the database file (read again when it changed).
TRACEBACK = "Traceback (most recent call last)"
FS_SIZE = "8m"
SLEEP = (2.0, 6.0)  # s: each trial's length, uniform (the stand-in's --sleep, a prior)
STARTUP = 5.0  # s: about the time to the first trials, 4-6 workers on 2 cores


@dataclass(frozen=True)
class Timings:
    """The search's timeouts, scaled down from job.sh's by about the lease's ratio (4 s for 90 s)."""

    heartbeat: int = 2  # ORION_HEARTBEAT (job.sh: 30): heartbeat deadline 4 x, a trial lost after 5 x.
    lease: float = 4.0  # ORION_TOOLS_LOCK_LEASE (90 s): the database lock's lease.
    algorithm_stale: float = 6.0  # ORION_TOOLS_ALGORITHM_LOCK_STALE (120 s): algorithm-lock takeover.
    database_timeout: float = 8.0  # storage.database.timeout (job.sh: 120 s): above lease + a poll.
    idle_timeout: int = 80  # worker.idle_timeout (job.sh: 1800 s).


@dataclass
class FaultPlan:
    kind: str
    at: float  # s after the search's start (slow-hold with the hook: when the worker stops itself)
    seconds: float  # how long: a stall, a full or read-only filesystem; kill: until the replacement starts
    rule: str = ""  # kill, stop: one of RULES
    k: int = 0  # worker #k (modulo the live workers), the fallback of the holder rules
    point: str = ""  # slow-hold: one of PAUSE_POINTS
    count: int = 1  # slow-hold: the worker stops the count-th time it reaches point (hook)
    action: str = "stop"  # slow-hold: "stop" (resumed after `seconds`) or "kill" (killed then, replaced)
    worker: int | None = None  # slow-hold with the hook: the initial worker started with it


@dataclass
class SearchPlan:
    seed: int
    algorithm: str
    workers: int
    budget: int
    sleep: tuple  # the stand-in's --sleep, a prior of the search (every worker has one command line)
    faults: list
    timings: Timings = field(default_factory=Timings)
    hook: bool = False


def hook_available(repo: Path = REPO_ROOT) -> bool:
    """Whether the orion_tools of `repo` has the test hook ORION_TOOLS_TEST_PAUSE."""
    return any(PAUSE_VARIABLE in path.read_text() for path in (Path(repo) / "orion_tools").glob("*.py"))


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return round(math.exp(rng.uniform(math.log(low), math.log(high))), 2)


def plan_search(seed: int, workers: int | None = None, budget: int | None = None, algorithm: str | None = None,
                faults: int | None = None, kinds: list | None = None, max_stall: float = 60.0,
                max_filesystem: float = 30.0, window: tuple | None = None, hook: bool | None = None,
                repo: Path = REPO_ROOT) -> SearchPlan:
    """The search of `seed`: every choice is drawn here, from the seed alone (each kind of choice
    from a generator of its own, so that an option given fixes that choice and leaves the others)."""
    config = random.Random(f"chaos-{seed}-config")
    drawn = (config.randint(4, 6), config.randint(10, 16), config.choice(["tpe", "random"]), config.randint(4, 8))
    workers = workers or drawn[0]
    budget = budget or drawn[1]
    algorithm = algorithm or drawn[2]
    count = len(kinds) if kinds else (faults if faults is not None else drawn[3])
    hook = hook_available(repo) if hook is None else hook
    # Faults start while the search would run without them: its workers' start, then its rounds of trials.
    window = window or (2.0, round(STARTUP + math.ceil(budget / workers) * sum(SLEEP) / 2, 1))
    rng = random.Random(f"chaos-{seed}-faults")
    planned = []
    for i in range(count):
        drawn_kind = rng.choices(KINDS, KIND_WEIGHTS)[0]  # Drawn even when given: the draws stay aligned.
        kind = kinds[i] if kinds else drawn_kind
        at = round(rng.uniform(*window), 1)
        rule, k = rng.choices(RULES, RULE_WEIGHTS)[0], rng.randrange(1000)
        point, n = rng.choice(PAUSE_POINTS), rng.randint(1, 3)
        action = "kill" if rng.random() < 0.2 else "stop"
        stall, filesystem, replace = (log_uniform(rng, 0.5, max_stall), log_uniform(rng, 0.5, max_filesystem),
                                      round(rng.uniform(0.0, 5.0), 1))
        fault = FaultPlan(kind, at, {"kill": replace, "full": filesystem, "read-only": filesystem}.get(kind, stall))
        if kind in ("kill", "stop"):
            fault.rule, fault.k = rule, k
        elif kind == "slow-hold":
            fault.point, fault.count, fault.action, fault.k = point, n, action, k
        planned.append(fault)
    # The hook's workers: one slow-hold per initial worker (the variable holds one point).
    free = list(range(workers))
    random.Random(f"chaos-{seed}-hook").shuffle(free)
    for fault in planned:
        if fault.kind == "slow-hold" and hook and free:
            fault.worker = free.pop()
    return SearchPlan(seed, algorithm, workers, budget, SLEEP, planned, Timings(), hook)


# --- Workers -----------------------------------------------------------------------------------

def clean_env(**overrides) -> dict:
    """As conftest's: the environment without Oríon or Slurm variables, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORION_", "SLURM_"))}
    env.update(PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def hunt_command(config: Path, working_dir: Path, records: Path, sleep: tuple, runs: Path,
                 standin: Path = STANDIN_TRIAL) -> list:
    """A worker as job.sh starts one (conftest.standin_hunt_command with these arguments). The
    trial's length is a prior: Oríon refuses workers of one experiment with other arguments."""
    return [sys.executable, "-W", "ignore", "-m", "orion_tools", "hunt", "--worker-records", str(records),
            "-n", EXPERIMENT, "--config", str(config), "--working-dir", str(working_dir),
            sys.executable, str(standin), "--learning-rate~loguniform(1e-5, 1.0)",
            f"--sleep~uniform({sleep[0]:g}, {sleep[1]:g})", "--record", str(runs)]


def write_config(path: Path, plan: SearchPlan, database: Path) -> None:
    algorithm = (f"tpe: {{seed: {plan.seed}, n_initial_points: {max(plan.workers, 5)}}}" if plan.algorithm == "tpe"
                 else f"random: {{seed: {plan.seed}}}")
    t = plan.timings
    path.write_text(
        f"experiment:\n  algorithm:\n    {algorithm}\n  max_trials: {plan.budget}\n  max_broken: 10\n"
        f"worker:\n  idle_timeout: {t.idle_timeout}\n  executor: singleexecutor\n"
        f"storage:\n  database:\n    type: pickleddb\n    host: {database}\n    timeout: {t.database_timeout:g}\n")


def own_host_names() -> bool:
    """Whether each worker can run under a host name of its own (a UTS namespace: root)."""
    try:
        return subprocess.run(["unshare", "--uts", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Worker:
    index: int
    process: subprocess.Popen
    out: Path
    err: Path
    records: Path
    pause: str | None = None
    replaces: int | None = None
    killed: bool = False  # SIGKILLed by a fault
    killed_at_timeout: bool = False
    under_fault: bool = False
    stopped_by_us: bool = False
    exit: int | None = None
    started: float = 0.0
    ended: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def name(self) -> str:
        return f"worker #{self.index}"


def process_state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat (R, S, T...), None once gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:][:1]


def group_members(pgid: int) -> list:
    """The live (not zombie) processes of process group `pgid`: "PID (command)" each."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z" and fields[2] == str(pgid):
            members.append(f"{entry.name} ({stat[stat.index('(') + 1:stat.rindex(')')]})")
    return members


def runs_a_trial(pid: int) -> bool:
    import psutil

    try:
        return any(STANDIN_TRIAL.name in " ".join(child.cmdline())
                   for child in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


# --- The database, read without its lock ---------------------------------------------------------

def read_database(path: Path):
    """(trials, algorithm documents) of the PickledDB file; FileNotFoundError if none yet; another
    exception if it cannot be read (a failed read is retried once the file changed: a torn read is
    one of a file that stays unreadable)."""
    with open(path, "rb") as file:
        db = pickle.load(file)._db
    return [trial_summary(t) for t in db["trials"].find({})], db["algo"].find({})


def trial_summary(document: dict) -> dict:
    objective = next((r.get("value") for r in document.get("results") or [] if r.get("type") == "objective"), None)
    rate = next((p.get("value") for p in document.get("params") or [] if p.get("name") == "/learning-rate"), None)
    return {"id": document.get("id", document["_id"]), "status": document.get("status"), "objective": objective,
            "learning_rate": rate}


def standin_objective(learning_rate: float) -> float:
    """What tests/standin_trial.py reports for this learning rate."""
    return abs(math.log10(learning_rate) + 3)


class DatabaseWatch:
    """Reads the database file every WATCH_EVERY s during a search (or is fed snapshots: `observe`)
    and keeps what it saw roll back, once per trial."""

    def __init__(self):
        self.final = {}  # id -> (status, objective, when first seen so): completed or broken
        self.ids = set()
        self.completed = 0
        self.reads = 0
        self.failed_reads = 0
        self.last_read = None  # The identity (inode, size, mtime) of the file last read.
        self.violations = []
        self._said = set()

    def _say(self, key, text: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.violations.append(text)

    def observe(self, trials: list, when: float = 0.0) -> None:
        self.reads += 1
        now = {t["id"]: t for t in trials}
        for trial_id in sorted(self.ids - set(now)):
            self._say(("gone", trial_id), f"rollback: trial {trial_id} disappeared from the database at {when:.1f} s")
        for trial_id, (status, objective, seen) in self.final.items():
            trial = now.get(trial_id)
            if trial is None:
                continue
            if trial["status"] != status:
                self._say(("status", trial_id), f"rollback: trial {trial_id}, {status} at {seen:.1f} s, "
                                                 f"is {trial['status']} at {when:.1f} s")
            elif trial["objective"] != objective:
                self._say(("objective", trial_id), f"rollback: trial {trial_id}'s objective changed from "
                                                    f"{objective} to {trial['objective']} at {when:.1f} s")
        completed = sum(t["status"] == "completed" for t in trials)
        if completed < self.completed:
            self._say(("count", self.completed, completed),
                      f"rollback: completed trials fell from {self.completed} to {completed} at {when:.1f} s")
        self.completed = completed
        for trial_id, trial in now.items():
            if trial["status"] in ("completed", "broken") and trial_id not in self.final:
                self.final[trial_id] = (trial["status"], trial["objective"], when)
        self.ids |= set(now)

    def look(self, path: Path, when: float) -> None:
        failures = []
        for _ in range(3):
            try:
                identity = os.stat(path)
                if (identity.st_ino, identity.st_size, identity.st_mtime_ns) == self.last_read:
                    return  # Unchanged since the last read (every write renames a new file in).
                trials, _ = read_database(path)
            except FileNotFoundError:
                return
            except Exception as error:  # noqa: BLE001 (a torn or foreign file: any unpickling error)
                failures.append(((identity.st_ino, identity.st_size, identity.st_mtime_ns), error))
                self.failed_reads += 1
                time.sleep(0.02)
                continue
            self.last_read = (identity.st_ino, identity.st_size, identity.st_mtime_ns)
            self.observe(trials, when)
            return
        if len({key for key, _ in failures}) == 1:  # The same file, unreadable three times.
            self._say(("unreadable", failures[0][0]), f"database unreadable at {when:.1f} s: "
                                                      f"{type(failures[0][1]).__name__}: {failures[0][1]}")


# --- A search ------------------------------------------------------------------------------------

class Search:
    def __init__(self, plan: SearchPlan, folder: Path, repo: Path = REPO_ROOT, log=print):
        self.plan, self.folder, self.repo, self.log = plan, Path(folder), Path(repo), log
        # The stand-in trial of the same checkout as orion_tools, if it has one.
        own = self.repo / "tests" / STANDIN_TRIAL.name
        self.standin = own if own.exists() else STANDIN_TRIAL
        self.db_dir = self.folder / "db"
        self.database = self.db_dir / "orion_db.pkl"
        self.runs = self.folder / "runs.jsonl"
        self.config = self.folder / "orion-config.yml"
        self.workers: list[Worker] = []
        self.lock = threading.RLock()
        self.fs_lock = threading.Lock()
        self.over = threading.Event()  # no new fault starts; filesystem faults end
        self.abort = threading.Event()  # every fault ends now (timeout, cleanup)
        self.pending = 0  # replacements to start before the search may end
        self.t0 = 0.0
        self.mounted = False
        self.shm = None  # the database's folder in /dev/shm, where no tmpfs of its own could be mounted
        self.filesystem_faults = None  # None: possible; else why not
        self.own_hosts = False
        self.watch = DatabaseWatch()
        self.fault_log = [{"kind": f.kind, "planned": asdict(f)} for f in plan.faults]
        self.harness_errors = []
        self.left_running = []  # processes of an exited worker's group, still running at the end
        self.timed_out = False
        self.targets = random.Random(f"chaos-{plan.seed}-targets")

    # -- time
    def now(self) -> float:
        return time.time() - self.t0

    def sleep(self, seconds: float, stop_when_over: bool = True) -> None:
        end = time.time() + seconds
        while time.time() < end and not self.abort.is_set() and not (stop_when_over and self.over.is_set()):
            time.sleep(min(0.05, max(0.0, end - time.time())))

    # -- the database's filesystem
    def mount(self) -> None:
        self.db_dir.mkdir(parents=True)
        if os.geteuid() != 0:
            self.filesystem_faults = "not root: cannot mount a tmpfs of its own"
        else:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_SIZE}", "tmpfs", str(self.db_dir)],
                                     capture_output=True, text=True)
            if mounted.returncode == 0:
                self.mounted = True
                return
            self.filesystem_faults = f"mount -t tmpfs failed: {mounted.stderr.strip()}"
        # A tmpfs all the same (Oríon's soft lock), without filesystem faults: a folder of /dev/shm
        # (not through a link: Oríon picks the lock from the path's own mount point).
        self.db_dir.rmdir()
        self.shm = self.db_dir = Path(tempfile.mkdtemp(prefix="chaos-db-", dir="/dev/shm"))
        self.database = self.db_dir / "orion_db.pkl"

    def check_lock_kind(self) -> None:
        from orion.core.io.database.pickleddb import _create_lock
        from filelock import SoftFileLock

        lock = _create_lock(str(self.database) + ".lock")
        if not isinstance(lock, SoftFileLock):
            raise RuntimeError(f"Oríon takes a {type(lock).__name__} for {self.database}, not the soft lock (lease) "
                               "the chaos test is for")

    def unmount(self) -> None:
        if self.mounted:
            with contextlib.suppress(OSError):
                shutil.copy2(self.database, self.folder / "orion_db.pkl")
            why = self.unmount_top()
            if why:
                self.harness_errors.append(f"umount {self.db_dir}: {why}; lazily unmounted")
                self.unmount_top(lazily=True)
            self.mounted = False
            if os.path.ismount(self.db_dir):
                self.harness_errors.append(f"{self.db_dir} is still a mount point: unmount it (umount -l)")
        elif self.shm is not None:
            with contextlib.suppress(OSError):
                shutil.copy2(self.database, self.folder / "orion_db.pkl")
            shutil.rmtree(self.shm, ignore_errors=True)
            self.shm = None

    def mount_command(self, *args) -> str | None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True)
        if done.returncode == 0:
            return None
        return done.stderr.strip() or f"mount {' '.join(args)}: exit {done.returncode}"

    def make_read_only(self) -> str | None:
        """The database's folder read-only for every operation from now on: a read-only bind mount
        over it. (`mount -o remount,ro` of the tmpfs itself is refused while any file on it is open
        for writing, as a lock marker is while a stalled worker holds it.) None, or why not."""
        why = self.mount_command("--bind", str(self.db_dir), str(self.db_dir))
        if why:
            return why
        why = self.mount_command("-o", "remount,bind,ro", str(self.db_dir))
        if why:
            self.unmount_top(lazily=True)
        return why

    def unmount_top(self, lazily: bool = False) -> str | None:
        """Unmounts the top mount of the database's folder (lazily: at once, for new operations)."""
        done = subprocess.run(["umount", *(["-l"] if lazily else []), str(self.db_dir)], capture_output=True, text=True)
        return None if done.returncode == 0 else done.stderr.strip() or f"umount: exit {done.returncode}"

    # -- workers
    def start_worker(self, replaces: int | None = None, pause: str | None = None) -> Worker:
        with self.lock:
            index = len(self.workers)
            records = self.folder / "records" / f"worker-{index}"
            records.mkdir(parents=True)
            t = self.plan.timings
            env = clean_env(ORION_DB_TYPE="pickleddb", ORION_DB_ADDRESS=self.database, ORION_HEARTBEAT=t.heartbeat,
                            ORION_TOOLS_LOCK_LEASE=f"{t.lease:g}",
                            ORION_TOOLS_ALGORITHM_LOCK_STALE=f"{t.algorithm_stale:g}",
                            OMP_NUM_THREADS=1)
            if pause:
                env[PAUSE_VARIABLE] = pause
            command = hunt_command(self.config, self.folder / "trials", records, self.plan.sleep, self.runs,
                                   self.standin)
            if self.own_hosts:
                command = ["unshare", "--uts", "sh", "-c", f'hostname node-{index} && exec "$@"', "sh", *command]
            out, err = self.folder / f"worker-{index}.out", self.folder / f"worker-{index}.err"
            with open(out, "w") as stdout, open(err, "w") as stderr:
                process = subprocess.Popen(command, cwd=self.repo, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                                           stderr=stderr, start_new_session=True)
            worker = Worker(index, process, out, err, records, pause, replaces, started=self.now())
            self.workers.append(worker)
            return worker

    def poll_workers(self) -> None:
        with self.lock:
            for worker in self.workers:
                if worker.exit is None and worker.process.poll() is not None:
                    worker.exit, worker.ended = worker.process.returncode, self.now()

    def live(self) -> list:
        with self.lock:
            return [w for w in self.workers if w.exit is None and not w.killed and w.process.poll() is None]

    def candidates(self) -> list:
        return [w for w in self.live() if not w.under_fault]

    def worker_k(self, k: int):
        candidates = self.candidates()
        return candidates[k % len(candidates)] if candidates else None

    def signal_group(self, worker: Worker, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, sig)

    # -- lock holders
    def database_holder(self):
        marker = Path(str(self.database) + ".lock")
        try:
            text = marker.read_text()
        except OSError:
            return None
        fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        pids = {int(fields["pid"])} if fields.get("pid", "").isdigit() else set()
        workers = self.candidates()
        found = [w for w in workers if w.pid in pids]
        if found:
            return found[0]
        if not pids:  # A marker of another format: who has it open.
            for worker in workers:
                with contextlib.suppress(OSError):
                    for fd in os.listdir(f"/proc/{worker.pid}/fd"):
                        with contextlib.suppress(OSError):
                            if os.readlink(f"/proc/{worker.pid}/fd/{fd}") == str(marker):
                                return worker
        return None

    def algorithm_lock(self):
        """The algorithm document's (locked, heartbeat), or None."""
        try:
            _, algos = read_database(self.database)
        except Exception:  # noqa: BLE001 (no file yet, or mid-fault)
            return None
        return next(((a.get("locked"), a.get("heartbeat")) for a in algos), None)

    def algorithm_holder(self, seen: dict):
        """(the worker holding the algorithm lock, the lock) if the file, read again once it changed,
        shows the lock taken while exactly one worker runs no trial (or, of several, exactly one
        is running on a CPU); else (None, None)."""
        try:
            stat = os.stat(self.database)
        except OSError:
            return None, None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if seen.get("key") != key:
            seen["key"], seen["lock"] = key, self.algorithm_lock()
        lock = seen.get("lock")
        if not lock or lock[0] != 1:
            return None, None
        idle = [w for w in self.candidates() if not runs_a_trial(w.pid)]
        if len(idle) > 1:
            idle = [w for w in idle if process_state(w.pid) == "R"]
        return (idle[0], lock) if len(idle) == 1 else (None, None)

    def find_target(self, rule: str, k: int, record: dict):
        """The worker `rule` picks now (see the module's docstring); records how it was found."""
        if rule in ("database-lock holder", "algorithm-lock holder"):
            deadline, file = time.time() + HOLDER_SEARCH, {}
            while time.time() < deadline and not self.over.is_set() and not self.abort.is_set():
                if rule == "database-lock holder":
                    worker, lock = self.database_holder(), None
                else:
                    worker, lock = self.algorithm_holder(file)
                if worker is not None:
                    record["holder"] = "seen"
                    if lock:
                        record["algorithm_lock_seen"] = str(lock[1])
                    return worker
                time.sleep(0.005 if rule == "database-lock holder" else 0.02)
            record["holder"] = "not seen: worker #k"
        return self.worker_k(k)

    def confirm_holder(self, worker: Worker, rule: str, record: dict) -> None:
        """Once stopped: does it still hold the lock it was picked for?"""
        if record.get("holder") != "seen":
            return
        if rule == "database-lock holder":
            marker = Path(str(self.database) + ".lock")
            with contextlib.suppress(OSError):
                if f"pid={worker.pid}\n" in marker.read_text() + "\n":
                    record["holder"] = "confirmed"
        else:  # Still taken, and by the same hold, half a second later: another holder would have let go.
            time.sleep(0.5)
            lock = self.algorithm_lock()
            if lock and lock[0] == 1 and str(lock[1]) == record.get("algorithm_lock_seen"):
                record["holder"] = "confirmed"

    # -- faults
    def run_fault(self, fault: FaultPlan, record: dict) -> None:
        try:
            if fault.kind == "slow-hold" and fault.worker is not None:
                self.hook_fault(fault, record)
                return
            self.sleep(max(0.0, self.t0 + fault.at - time.time()))
            if self.over.is_set() or self.abort.is_set():
                record["skipped"] = "the search had ended"
                return
            if fault.kind in ("full", "read-only"):
                self.filesystem_fault(fault, record)
            else:
                self.process_fault(fault, record)
        except Exception as error:  # noqa: BLE001 (a harness bug: said, never hidden)
            self.harness_errors.append(f"fault {record['planned']}: {type(error).__name__}: {error}")

    def process_fault(self, fault: FaultPlan, record: dict) -> None:
        if fault.kind == "slow-hold":  # Without the hook: the holder of the point's lock.
            in_database = fault.point in ("holding-database", "before-rename")
            rule = "database-lock holder" if in_database else "algorithm-lock holder"
            action = fault.action
        else:
            rule, action = fault.rule, fault.kind
        record["rule"] = rule
        worker = self.find_target(rule, fault.k, record)
        with self.lock:
            if worker is None or self.over.is_set() or worker.exit is not None or worker.under_fault:
                record["skipped"] = "no live worker to target" if worker is None or worker.exit is not None else \
                    "the search had ended" if self.over.is_set() else "its target was under another fault"
                return
            worker.under_fault = True
            if action == "kill":
                worker.killed = True
                self.pending += 1
        try:
            record.update(target=worker.name, pid=worker.pid, start=round(self.now(), 2))
            if action == "kill":
                self.signal_group(worker, signal.SIGKILL)
                self.confirm_holder(worker, rule, record)
                record["applied"] = True
                self.sleep(fault.seconds if fault.kind == "kill" else 0.0, stop_when_over=False)
                if not self.abort.is_set():
                    replacement = self.start_worker(replaces=worker.index)
                    record["replacement"] = replacement.name
            else:
                worker.stopped_by_us = True
                self.signal_group(worker, signal.SIGSTOP)
                self.confirm_holder(worker, rule, record)
                record["applied"] = True
                self.sleep(fault.seconds, stop_when_over=False)
                self.signal_group(worker, signal.SIGCONT)
                worker.stopped_by_us = False
            record["end"] = round(self.now(), 2)
        finally:
            with self.lock:
                worker.under_fault = False
                if action == "kill":
                    self.pending -= 1

    def hook_fault(self, fault: FaultPlan, record: dict) -> None:
        """The worker started with ORION_TOOLS_TEST_PAUSE stops itself at its point: held, then resumed or killed."""
        worker = self.workers[fault.worker]
        record.update(target=worker.name, pid=worker.pid, rule=f"{PAUSE_VARIABLE}={worker.pause}")
        while True:
            if self.abort.is_set() or worker.exit is not None or worker.killed or worker.process.poll() is not None:
                record["skipped"] = "its worker never reached the point"
                return
            if process_state(worker.pid) == "T" and not worker.stopped_by_us:
                break
            time.sleep(0.05)
        with self.lock:
            worker.under_fault = True
            if fault.action == "kill":
                self.pending += 1
                worker.killed = True
        try:
            record.update(start=round(self.now(), 2), applied=True)
            self.sleep(fault.seconds, stop_when_over=False)
            if fault.action == "kill":
                self.signal_group(worker, signal.SIGKILL)
                if not self.abort.is_set():
                    record["replacement"] = self.start_worker(replaces=worker.index).name
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGCONT)  # It stopped itself only, not its trial.
            record["end"] = round(self.now(), 2)
        finally:
            with self.lock:
                worker.under_fault = False
                if fault.action == "kill":
                    self.pending -= 1

    def filesystem_fault(self, fault: FaultPlan, record: dict) -> None:
        if self.filesystem_faults:
            record["skipped"] = self.filesystem_faults
            return
        with self.fs_lock:  # One at a time: a full filesystem cannot be made read-only, nor filled when so.
            if self.over.is_set() or self.abort.is_set():
                record["skipped"] = "the search had ended"
                return
            record["start"] = round(self.now(), 2)
            if fault.kind == "full":
                filler = self.db_dir / "chaos-filler"
                try:
                    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
                    try:
                        stat = os.statvfs(self.db_dir)
                        with contextlib.suppress(OSError):
                            os.posix_fallocate(fd, 0, stat.f_bavail * stat.f_frsize)
                        block = b"\0" * (1 << 16)
                        with contextlib.suppress(OSError):
                            while True:
                                os.write(fd, block)
                    finally:
                        os.close(fd)
                    stat = os.statvfs(self.db_dir)
                    record.update(applied=True, free_bytes_left=stat.f_bavail * stat.f_frsize)
                    self.sleep(fault.seconds)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(filler)
            else:
                why = self.make_read_only()
                if why:
                    record["skipped"] = f"could not make it read-only: {why}"
                    return
                try:
                    record["applied"] = True
                    self.sleep(fault.seconds)
                finally:
                    # Lazily if busy (a stalled worker with a file open there, read-only): gone for every
                    # new operation at once; what was opened read-only stays so.
                    if self.unmount_top() and self.unmount_top(lazily=True):
                        self.harness_errors.append("the read-only bind mount could not be removed")
            record["end"] = round(self.now(), 2)

    # -- the run
    def run(self, timeout: float) -> None:
        self.own_hosts = own_host_names()
        self.mount()
        self.check_lock_kind()
        write_config(self.config, self.plan, self.database)
        (self.folder / "trials").mkdir()
        pauses = {f.worker: f"{f.point}:{f.count}" for f in self.plan.faults
                  if f.kind == "slow-hold" and f.worker is not None}
        watching = threading.Event()

        def sample():
            while not watching.is_set():
                self.watch.look(self.database, self.now())
                watching.wait(WATCH_EVERY)

        threads = []
        sampler = threading.Thread(target=sample, name="chaos-watch", daemon=True)
        self.t0 = time.time()
        sampler.start()
        try:
            for i in range(self.plan.workers):
                self.start_worker(pause=pauses.get(i))
            for fault, record in zip(self.plan.faults, self.fault_log):
                thread = threading.Thread(target=self.run_fault, args=(fault, record), daemon=True)
                thread.start()
                threads.append(thread)
            deadline = self.t0 + timeout
            while True:
                self.poll_workers()
                with self.lock:
                    if self.pending == 0 and all(w.exit is not None for w in self.workers):
                        self.over.set()
                        break
                if time.time() >= deadline:
                    self.timed_out = True
                    break
                time.sleep(0.2)
        finally:
            self.over.set()
            if self.timed_out or sys.exc_info()[0] is not None:
                self.abort.set()
            self.stop_everything()
            for thread in threads:
                thread.join(timeout=90)
                if thread.is_alive():
                    self.harness_errors.append("a fault's thread did not end")
            watching.set()
            sampler.join(timeout=30)
            self.watch.look(self.database, self.now())
            self.wall = self.now()

    def stop_everything(self) -> None:
        """Kills the workers still running (resumed first: never left stopped), and waits for them;
        then what is left of an exited worker's process group (a trial that outlived its worker)."""
        with self.lock:
            left = [w for w in self.workers if w.process.poll() is None]
        for worker in left:
            worker.killed_at_timeout = not worker.killed
            self.signal_group(worker, signal.SIGKILL)
            self.signal_group(worker, signal.SIGCONT)
        for worker in self.workers:
            worker.process.wait()
        self.poll_workers()
        for worker in self.workers:
            if worker not in left and not worker.killed:
                survivors = group_members(worker.pid)
                if survivors:
                    self.left_running.append(f"{worker.name}: {', '.join(survivors)}")
                    self.signal_group(worker, signal.SIGKILL)
                    self.signal_group(worker, signal.SIGCONT)
        self.abort.set()  # The faults' threads end (a replacement is no longer started).


# --- What a search left, and the checker -----------------------------------------------------

def read_lines(path: Path) -> list:
    if not path.exists():
        return []
    lines = []
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            lines.append(json.loads(line))
    return lines


def job_verdict(records: Path, hunt_status: int, database: Path, trials_dir: Path) -> tuple:
    """(exit code, output) of `python -m orion_tools job-verdict` for one worker's records, in this process."""
    import orion_tools

    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            code = orion_tools.job_verdict(Namespace(worker_records=str(records), hunt_status=hunt_status,
                                                     experiment=EXPERIMENT, database=str(database),
                                                     trials_dir=str(trials_dir)))
        except BaseException as error:  # noqa: BLE001 (reported as a violation)
            return None, f"{type(error).__name__}: {error}"
    return code, output.getvalue()


def outcome_of(search: Search) -> dict:
    """What a search left, as `check` reads it (JSON-ready)."""
    database = search.folder / "orion_db.pkl" if (search.folder / "orion_db.pkl").exists() else search.database
    trials, database_error = [], None
    try:
        trials, _ = read_database(database)
    except Exception as error:  # noqa: BLE001
        database_error = f"{type(error).__name__}: {error}"
    workers = []
    for worker in search.workers:
        entry = {"name": worker.name, "pid": worker.pid, "exit": worker.exit, "killed_by_harness": worker.killed,
                 "killed_at_timeout": worker.killed_at_timeout, "pause": worker.pause, "replaces": worker.replaces,
                 "started": round(worker.started, 2),
                 "ended": round(worker.ended, 2) if worker.ended is not None else None,
                 "stdout": worker.out.read_text(errors="replace") if worker.out.exists() else "",
                 "stderr": worker.err.read_text(errors="replace") if worker.err.exists() else "",
                 "records": [r for path in sorted(worker.records.glob("*.jsonl")) for r in read_lines(path)],
                 "verdict": None, "verdict_output": None}
        if not worker.killed and not worker.killed_at_timeout and database_error is None:
            entry["verdict"], entry["verdict_output"] = job_verdict(worker.records, worker.exit, database,
                                                                     search.folder / "trials")
        workers.append(entry)
    return {"budget": search.plan.budget, "trials": trials, "database_error": database_error,
            "runs": read_lines(search.runs), "workers": workers, "rollbacks": list(search.watch.violations),
            "database_reads": search.watch.reads, "timed_out": search.timed_out,
            "left_running": list(search.left_running)}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check(outcome: dict) -> list:
    """Every invariant a search broke, one string each (see the module's docstring)."""
    violations = list(outcome.get("rollbacks", []))
    if outcome.get("timed_out"):
        left = [w["name"] for w in outcome["workers"] if w.get("killed_at_timeout")]
        violations.append(f"the search did not end in time: {', '.join(left) or 'no worker'} still running, killed")
    for survivors in outcome.get("left_running", []):
        violations.append(f"still running after its worker exited: {survivors}")
    workers = outcome["workers"]
    for worker in workers:
        name, text = worker["name"], worker["stdout"] + "\n" + worker["stderr"]
        if TRACEBACK in text:
            after = text[text.index(TRACEBACK):].splitlines()
            cause = next((line for line in after[1:] if line.strip() and not line.startswith(" ")), "?")
            violations.append(f"{name}: a traceback in its output ({cause.strip()[:200]})")
        if worker["killed_by_harness"] or worker.get("killed_at_timeout"):
            continue
        errors = [line for line in worker["stderr"].splitlines() if line.startswith("error: ")]
        code = worker["exit"]
        if code is not None and code < 0:
            violations.append(f"{name}: killed by signal {-code}, which the harness did not send")
        elif code != 0 and not last_line(worker["stderr"]).startswith("error: "):
            violations.append(f"{name}: exit {code}, and its last line is not an `error:` line: "
                              f"{last_line(worker['stderr'])[:200]!r}")
        elif code == 0 and errors:
            violations.append(f"{name}: exit 0 after an error line: {errors[-1][:200]!r}")
        outcomes = {r.get("outcome") for r in worker["records"]}
        if "verdict" in worker and (worker["verdict"] is not None or worker.get("verdict_output")):
            expected_failure = code != 0 or bool(outcomes & {"broken", "killed"})
            if worker["verdict"] is None:
                violations.append(f"{name}: job-verdict failed: {worker['verdict_output'][:200]}")
            elif bool(worker["verdict"]) != expected_failure:
                violations.append(f"{name}: job.sh's verdict {worker['verdict']} for a worker that exited {code} "
                                  f"and recorded {sorted(o for o in outcomes if o)}")
    if outcome.get("database_error"):
        violations.append(f"the database is unreadable at the end: {outcome['database_error']}")
        return violations
    trials = {t["id"]: t for t in outcome["trials"]}
    budget = outcome["budget"]
    counted = [t for t in trials.values() if t["status"] != "broken"]
    completed = [t for t in trials.values() if t["status"] == "completed"]
    if len(counted) > budget:
        violations.append(f"budget overshot: {len(counted)} trials for a budget of {budget}")
    if len(completed) < budget:
        failed = [w["name"] for w in workers if not w["killed_by_harness"] and not w.get("killed_at_timeout")
                  and w["exit"] not in (0, None) and last_line(w["stderr"]).startswith("error: ")]
        if not failed:
            violations.append(f"{len(completed)} of {budget} trials completed, and no worker said why "
                              "(none exited non-zero with an `error:` line)")
    for trial in trials.values():
        if trial["status"] == "reserved":
            violations.append(f"trial {trial['id']} left reserved")
        elif trial["status"] == "broken":
            violations.append(f"trial {trial['id']} broken (the stand-in never fails: the machinery broke it)")
    runs = {}
    for run in outcome["runs"]:
        runs.setdefault(run.get("trial"), []).append(run)
    for trial_id, trial_runs in runs.items():
        if len(trial_runs) > 1:
            hosts = ", ".join(f"{r.get('host')}/{r.get('pid')}" for r in trial_runs)
            violations.append(f"trial {trial_id} ran to its end {len(trial_runs)} times ({hosts})")
        trial = trials.get(trial_id)
        if trial is None:
            violations.append(f"trial {trial_id} ran to its end but is not in the database")
        elif trial["status"] != "completed":
            violations.append(f"trial {trial_id} ran to its end but is {trial['status']}: its result was lost")
    for trial in completed:
        if trial["objective"] is None:
            violations.append(f"completed trial {trial['id']} has no objective")
        elif trial["learning_rate"] is not None and not math.isclose(
                trial["objective"], standin_objective(trial["learning_rate"]), rel_tol=1e-9, abs_tol=1e-9):
            violations.append(f"completed trial {trial['id']}'s objective {trial['objective']} is not its run's "
                              f"{standin_objective(trial['learning_rate'])}")
        if trial["id"] not in runs:
            violations.append(f"completed trial {trial['id']} never ran to its end (no --record line)")
    for worker in workers:
        for record in worker["records"]:
            trial = trials.get(record.get("trial"))
            status = trial["status"] if trial else "missing"
            if record.get("outcome") == "completed" and status != "completed":
                violations.append(f"{worker['name']} recorded trial {record.get('trial')} completed; "
                                  f"the database has it {status}")
            elif record.get("outcome") == "broken":
                violations.append(f"{worker['name']} recorded trial {record.get('trial')} broken")
    return violations


# --- One search, start to end --------------------------------------------------------------------

def run_search(plan: SearchPlan, folder: Path, timeout: float = 600.0, repo: Path = REPO_ROOT, log=print) -> dict:
    """Runs the search of `plan` in `folder` (new or empty) and returns what it left, its faults
    and its violations (JSON-ready). `repo`: where the workers run `python -m orion_tools` and its
    tests/standin_trial.py (another checkout, to compare versions; else this checkout's stand-in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    search = Search(plan, folder, repo, log)
    try:
        search.run(timeout)
        outcome = outcome_of(search)
    finally:
        search.unmount()
    violations = check(outcome)
    statuses = {}
    for trial in outcome["trials"]:
        statuses[trial["status"]] = statuses.get(trial["status"], 0) + 1
    result = {
        "seed": plan.seed, "repo": str(repo), "algorithm": plan.algorithm, "workers": plan.workers,
        "budget": plan.budget,
        "hook": plan.hook, "timings": asdict(plan.timings), "own_host_names": search.own_hosts,
        "filesystem_faults": search.filesystem_faults or "possible (tmpfs of its own)",
        "wall_seconds": round(search.wall, 1), "statuses": statuses,
        "completed": statuses.get("completed", 0), "runs": len(outcome["runs"]),
        "workers_started": len(search.workers), "faults": search.fault_log,
        "faults_applied": sum(bool(r.get("applied")) for r in search.fault_log),
        "exits": {w["name"]: w["exit"] for w in outcome["workers"]},
        "errors": {w["name"]: last_line(w["stderr"]) for w in outcome["workers"]
                   if last_line(w["stderr"]).startswith("error: ")},
        "database_reads": outcome["database_reads"],
        "violations": violations, "harness_errors": search.harness_errors, "folder": str(folder),
    }
    (folder / "result.json").write_text(json.dumps({**result, "outcome": outcome}, indent=1, default=str))
    return result


def applied_by_kind(results: list) -> dict:
    counts = {kind: 0 for kind in KINDS}
    for result in results:
        for record in result["faults"]:
            if record.get("applied"):
                counts[record["kind"]] += 1
    return counts


def one_line(result: dict) -> str:
    kinds = {}
    for record in result["faults"]:
        if record.get("applied"):
            kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
    holders = sum(record.get("holder") == "confirmed" for record in result["faults"])
    return (f"seed {result['seed']}: {result['algorithm']}, {result['workers']} workers "
            f"(+{result['workers_started'] - result['workers']} replacements), budget {result['budget']}: "
            f"{result['completed']} completed, {result['runs']} runs to the end, {result['wall_seconds']:.0f} s; "
            f"faults {result['faults_applied']}/{len(result['faults'])} "
            f"({', '.join(f'{k} {n}' for k, n in kinds.items()) or 'none'}; {holders} on a confirmed lock holder); "
            f"violations: {len(result['violations'])}"
            + (f"; HARNESS ERRORS: {len(result['harness_errors'])}" if result["harness_errors"] else ""))
