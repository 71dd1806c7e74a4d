"""What the workers record, and what is read from it: who runs a trial (its folder's worker.json),
how each of a worker's trials ended (--worker-records DIR), Oríon's runner tracebacks kept in the
worker's log; `reclaim` (a requeued job takes its own trials back). A job's verdict reads the
worker records: verdict.py.
"""

import datetime
import json
import logging
import os
import socket
import time
from pathlib import Path


import orion.core
from orion.client import get_experiment
from orion.core.io.convert import JSONConverter
from orion.core.worker.consumer import Consumer, ExecutionError
from orion.core.utils.exceptions import NoConfigurationError
from orion.storage.base import FailedUpdate  # Not in orion.core.utils.exceptions.

from .database import storage, test_pause, waiting_out_outages
from .heartbeat import CURRENT_TRIAL, WORKER_FILE, iso



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
    their heartbeat is 5 x ORION_HEARTBEAT old (see docs/preemption.md). A trial is ours
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



ORIONS_CONSUMER_CALL = Consumer.__call__
WORKER_RECORDS: Path | None = None  # hunt's --worker-records.


def record_outcome(trial, outcome: str) -> None:
    if WORKER_RECORDS is None:
        return
    line = json.dumps({"trial": trial.id, "outcome": outcome, "end": time.time()}) + "\n"

    def append() -> None:
        with open(WORKER_RECORDS / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as file:
            file.write(line)
    waiting_out_outages(append, f"the worker records {WORKER_RECORDS}")


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


def result_left_by_a_dead_worker(trial) -> list | None:
    """The result of a run of `trial` that ended, in a worker that died (or stalled) before it
    recorded it, if its folder holds one: worker.json names this trial (not an ASHA parent whose
    folder was copied), another reservation, and a results file with a result in it."""
    worker = worker_of(Path(trial.working_dir))
    if (worker.get("trial"), worker.get("experiment")) != (trial.id, str(trial.experiment)) \
            or not worker.get("results") or worker.get("reserved_at") == iso(trial.start_time):
        return None  # (Trial ids do not name their experiment: a folder another search left is not this trial's.)
    try:
        results = JSONConverter().parse(worker["results"])  # How Oríon's consumer reads it.
    except (OSError, ValueError):  # None: the run did not end (interrupted, killed, taken over).
        return None
    return results if isinstance(results, list) and results else None


def consume_and_record(self, trial, **kwargs):
    """Oríon's run of one trial (`Consumer.__call__`), which records who ran it and how it ended,
    and records without running it again the result of a run whose worker died before recording it."""
    CURRENT_TRIAL[0] = trial
    left = result_left_by_a_dead_worker(trial)
    if left is not None:
        print(f"Trial {trial.id} had run to its end in a worker that stopped before recording its result: that "
              "result is recorded now, without running the trial again", flush=True)
        record_outcome(trial, "completed")
        return left
    try:  # run_trial writes the trial's worker.json, once its reservation is checked.
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
    test_pause("trial-ended")
    return results


# A worker that found no trial to run for `idle_timeout` stops with Oríon's LazyWorkers (a
# traceback), which job.sh took for "done". It is, only when nothing is left for this worker:
# the budget is reached, or the trials left are reserved by live workers (fresh heartbeat),
# which stay until the end (`done_within_budget`). Otherwise the search is stuck: ASHA, for one,
# keeps a broken trial in its rung with no objective, so a rung that needs it never fills and
# no trial is promoted (orion/algo/hyperband.py). Then one line, exit 1.
