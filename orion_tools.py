"""What job.sh asks of Oríon's database, beyond `orion hunt`: one subcommand per task.

    python orion_tools.py hunt [--worker-records DIR] -n NAME --config FILE ... python main.py ...
                                                  # orion hunt, exact budget; records what it ran
    python orion_tools.py reclaim --experiment NAME --trials-dir DIR --job-id ID --since EPOCH
    python orion_tools.py job-verdict --worker-records DIR --hunt-status N [--experiment NAME]
                                                  # what a job ran, its exit code
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
import datetime
import io
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import yaml

import orion.core
import orion.core.cli.hunt
import orion.core.io.database.pickleddb
from filelock import SoftFileLock
from orion.client import get_experiment
from orion.core.cli.base import OrionArgsParser
from orion.core.io.database import DatabaseTimeout, DuplicateKeyError
from orion.core.io.orion_cmdline_parser import OrionCmdlineParser
from orion.core.io.space_builder import SpaceBuilder
from orion.core.worker.consumer import Consumer, ExecutionError
from orion.core.worker.experiment import Experiment
from orion.core.worker.producer import Producer
from orion.core.worker.trial_pacemaker import TrialPacemaker
from orion.core.utils.exceptions import LazyWorkers, NoConfigurationError
from orion.storage.base import FailedUpdate  # Not in orion.core.utils.exceptions.

# What a worker writes in a trial's folder when it starts running the trial (`record_worker`).
WORKER_FILE = "worker.json"


# --- The database lock: what every subcommand gets -------------------------------------------
# PickledDB locks its file for each read and write (well under a second each). Where the
# filesystem has flock (ext4, GPFS, Lustre mounted with flock) the kernel releases the lock of
# a process that dies. Elsewhere (NFS, tmpfs, XFS, Lustre without flock) Oríon uses a
# SoftFileLock: a marker file, `orion_db.pkl.lock`, that exists while a process holds the
# lock. A worker SIGKILLed while holding it (Slurm does so on preemption, node failure and
# after the grace time) leaves the marker behind; filelock only judges it stale when it was
# written on this host by a process that is gone, so a marker from another node stopped every
# worker, for good. Here, the next process that waits for a marker older than
# DATABASE_LOCK_LIFETIME breaks it (see README, "Many workers on one database").
DATABASE_LOCK_LIFETIME = 30  # s; a thousand times the usual hold of the lock.
# How long a process waits for the lock before Oríon's DatabaseTimeout: above the lifetime, so
# that a stale marker is broken before anyone gives up. (Oríon's default is 60 s; job.sh puts
# this value in the workers' configuration, `storage.database.timeout`.)
DATABASE_LOCK_TIMEOUT = 120  # s

ORIONS_CREATE_LOCK = orion.core.io.database.pickleddb._create_lock  # Before `main` replaces it.


def lock_with_lifetime(path):
    """Oríon's lock for the database file, a soft one breakable after DATABASE_LOCK_LIFETIME."""
    lock = ORIONS_CREATE_LOCK(path)
    if isinstance(lock, SoftFileLock):
        lock.lifetime = DATABASE_LOCK_LIFETIME
    return lock


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


def produce_within_budget(self, pool_size, timeout=60, retry_interval=1) -> int:
    """Oríon's `Producer.produce`, suggesting no more trials than the budget has left."""
    produced = 0
    with self.experiment.acquire_algorithm_lock(timeout=timeout, retry_interval=retry_interval) as algorithm:
        # Counted under the lock: no other worker produces meanwhile.
        left = trials_left(self.experiment, self.experiment.fetch_trials(with_evc_tree=False))
        for trial in algorithm.suggest(min(pool_size, left)) if left > 0 else []:
            try:
                self.experiment.register_trial(trial)
                produced += 1
            except DuplicateKeyError:  # The algorithm suggested a trial it had already.
                pass
    return produced


ORIONS_IS_DONE = Experiment.is_done  # Before `hunt` replaces it.


def done_within_budget(self) -> bool:
    """Oríon's `is_done`, or: the budget is used up and no trial is waiting for a worker.

    A waiting trial is `new`, `interrupted` (preempted), or `reserved` by a worker that died
    (no heartbeat for 5 x ORION_HEARTBEAT: Oríon then hands it out again).
    """
    if ORIONS_IS_DONE.fget(self):
        return True
    lost_before = datetime.datetime.utcnow() - datetime.timedelta(seconds=5 * orion.core.config.worker.heartbeat)
    trials = self.fetch_trials(with_evc_tree=False)  # One read of the database for both questions.
    waiting = [
        trial for trial in trials
        if trial.status in ("new", "interrupted")
        or (trial.status == "reserved" and trial.heartbeat is not None and trial.heartbeat <= lost_before)
    ]
    return trials_left(self, trials) <= 0 and not waiting



# Three more faults that Oríon 0.2.7 does not handle in a worker:
# - A DatabaseTimeout in the heartbeat thread ended that thread without a word, while the trial
#   went on: 5 x ORION_HEARTBEAT later, another worker took the trial and ran it too.
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


def observe_patiently(self, trial) -> None:
    """Oríon's `Producer.observe`, waiting up to ALGORITHM_LOCK_TIMEOUT for the algorithm's lock."""
    with self.experiment.acquire_algorithm_lock(timeout=ALGORITHM_LOCK_TIMEOUT) as algorithm:
        algorithm.observe([trial])


ORIONS_MONITOR_TRIAL = TrialPacemaker._monitor_trial


def monitor_trial_through_timeouts(self) -> None:
    """Oríon's heartbeat of a running trial, which retries when the database stays locked."""
    while not self.stopped.is_set():
        try:
            return ORIONS_MONITOR_TRIAL(self)
        except DatabaseTimeout:
            print(f"warning: the database stayed locked for {DATABASE_LOCK_TIMEOUT} s: heartbeat of trial "
                  f"{self.trial.id} late; trying again", file=sys.stderr, flush=True)


ORIONS_EXECUTE_PROCESS = Consumer.execute_process


def execute_killed_as_interrupted(self, cmd_args, environ) -> None:
    """Oríon's run of the trial's command, where a SIGKILL means `interrupted`, not `broken`."""
    try:
        ORIONS_EXECUTE_PROCESS(self, cmd_args, environ)
    except ExecutionError as error:
        if error.return_code != -signal.SIGKILL:
            raise
        print("error: the trial was killed (SIGKILL: out of host memory? `sacct -j $SLURM_JOB_ID` says); "
              "it is marked interrupted and resumes later from its last checkpoint; this worker stops",
              file=sys.stderr, flush=True)
        # The exit status Oríon's runner takes for "interrupted": it then releases the trial
        # as such and stops, as on Ctrl-C.
        interrupted = ExecutionError(orion.core.config.worker.interrupt_signal_code)
        interrupted.killed = True  # For the worker's record (`consume_and_record`).
        raise interrupted from error


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
    """Writes `path` through a temporary name of this host and process, then renames it: a reader,
    or another worker, never sees half of it."""
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, temporary.with_name(path.name))


def record_worker(trial) -> None:
    write_whole(Path(trial.working_dir, WORKER_FILE), json.dumps({
        "slurm_job": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
        "reserved_at": iso(trial.start_time)}))


def record_outcome(trial, outcome: str) -> None:
    if WORKER_RECORDS is None:
        return
    line = json.dumps({"trial": trial.id if trial is not None else None, "outcome": outcome, "end": time.time()}) + "\n"
    with open(WORKER_RECORDS / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as file:
        file.write(line)


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
    Producer.produce = produce_within_budget
    Producer.observe = observe_patiently
    Experiment.is_done = property(done_within_budget)
    TrialPacemaker._monitor_trial = monitor_trial_through_timeouts
    Consumer.execute_process = execute_killed_as_interrupted
    # Oríon's own `orion.core.cli.main` builds the parser of every subcommand, and one of them
    # imports torch (3.8 s and ~400 MiB per worker; see `main`): only hunt's parser here.
    parser = OrionArgsParser()
    orion.core.cli.hunt.add_subparser(parser.get_subparsers())
    try:
        return parser.execute(["hunt", *hunt_arguments]) or 0
    except LazyWorkers:
        # Nothing to run for worker.idle_timeout: ASHA waiting for a rung to fill. Success only if
        # the budget is reached, which `job-verdict` checks in the database.
        print("No trial came for this worker within its idle_timeout: it stops", flush=True)
        record_outcome(None, "idle_timeout")
        return 0


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
    """Says what this job's workers ran and how it ended; exit 1 if a trial broke or was killed, or
    the search stopped short of its budget, or a worker failed (--hunt-status)."""
    records = read_worker_records(Path(args.worker_records))
    outcomes = collections.Counter(r.get("outcome") for r in records if r.get("trial"))
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
    if any(r.get("outcome") == "idle_timeout" for r in records):
        experiment, trials = open_experiment(args)
        if not is_done(experiment, trials):
            print(f"error: a worker of this job waited its idle_timeout for a trial, and the search is not done "
                  f"({by_status(trials)}; budget {experiment.max_trials}): see `{db} uv run orion status -n "
                  f"{args.experiment}`", file=sys.stderr)
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
    """Validation accuracy against epochs, one line per trial with metrics (the best one bold)."""
    import plotly.graph_objects as go

    best = best_trial(trials)
    max_epoch = max((r["epoch"] + 1 for records in metrics.values() for r in records), default=0)
    figure = go.Figure()
    for trial in trials:
        records = sorted(metrics.get(trial.id, []), key=lambda r: r["epoch"])
        if not records:
            continue
        is_best = best is not None and trial.id == best.id
        figure.add_trace(go.Scatter(
            x=[r["epoch"] + 1 for r in records], y=[r.get("val_accuracy") for r in records],
            mode="lines+markers", name=f"{trial.id[:8]} ({trial.status})" + (" best" if is_best else ""),
            line=dict(width=4 if is_best else 1.5), marker=dict(size=6 if is_best else 4),
            opacity=1.0 if is_best else 0.6,
        ))
    figure.update_layout(title="Learning curves: validation accuracy per epoch, one line per trial",
                         xaxis_title="Epochs trained", yaxis_title="Validation accuracy", yaxis_tickformat=".0%",
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
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
    temporary = output / f".summary.txt.{os.getpid()}.tmp"
    temporary.write_text(text)
    os.replace(temporary, output / "summary.txt")
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
    temporary = backup_path.with_name(f"{backup_path.name}.{os.getpid()}.tmp")
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
    main.parse_args(arguments)  # argparse's own one-line error, exit 2.
    for name, prior in priors.items():
        try:
            [dimension] = SpaceBuilder().build({name.lstrip("-"): prior}).values()
        except Exception:
            continue  # A malformed prior: check-experiment says why, in step 4.
        ends = dimension.interval() if dimension.type != "categorical" else dimension.categories
        for value in ends:
            refused = io.StringIO()
            try:
                with contextlib.redirect_stderr(refused):
                    main.parse_args([*arguments, f"{name}={value}"])
            except SystemExit:
                why = refused.getvalue().strip().removeprefix("main.py: error: ").removesuffix(" (see --help)")
                print(f"error: the prior {name}~'{prior}' in job.sh reaches {value}, which main.py refuses ({why}): "
                      "keep its range within what main.py's parse_args accepts", file=sys.stderr)
                sys.exit(2)
    print(main.dataset.__file__)


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
    orion.core.io.database.pickleddb._create_lock = lock_with_lifetime
    if argv[:1] == ["hunt"]:  # argparse would take `orion hunt`'s options as its own.
        return hunt(argv[1:])
    args = parse_args(argv)
    try:
        return args.run(args)
    except ReportError as error:  # No experiment to read: one line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
