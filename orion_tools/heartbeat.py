"""A running trial's heartbeat (`beat`, every ORION_HEARTBEAT, for as long as it takes), its
reservation (heartbeat, status and results written into it only), the trial's process
(`run_trial`), and a worker that stops in one line (`stop_worker`).
"""

import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


import orion.core
from orion.core.worker.consumer import ExecutionError
from orion.core.worker.trial import validate_status
from orion.core.utils.exceptions import InexecutableUserScript
from orion.storage.base import FailedUpdate

from .budget import RAN_A_TRIAL
from .database import LAST_LINE_SAID, OUTAGE_SAID, DatabaseLockError, write_whole

# --- The heartbeat of a running trial, and its reservation --------------------------------------
# Oríon 0.2.7's pacemaker wrote the heartbeat every 60 s, hard-coded, whatever ORION_HEARTBEAT
# said; an error (a DatabaseTimeout, a file server's ESTALE) ended the thread without a word; and
# once the trial was taken for lost, it stopped silently while the trial went on, run a second
# time by another worker in the same folder. An earlier version of this file stopped the trial
# when the heartbeat could not be written for 4 x ORION_HEARTBEAT: one dead worker holding the
# database's lock then stopped every running trial. Here (`beat`): a heartbeat every
# ORION_HEARTBEAT s; one that cannot be written (the database locked, full, read-only) is tried
# again every second for as long as it takes, while the trial runs on: another worker takes the
# trial for lost only after watching its heartbeat stand still while the database was usable
# (lost_trials.py), which a waiting heartbeat is not. The heartbeat, and the trial's result, are
# written only into this worker's own reservation (the trial's start_time, which Oríon sets at
# each reservation): a worker stalled past its trial's loss cannot refresh, or complete, the
# reservation of the worker that runs the trial now. Once the trial is no longer reserved by this
# worker while it runs, the worker stops it (SIGTERM: main.py saves a checkpoint; SIGKILL after
# ORION_HEARTBEAT / 2), says why in one line and exits 1.
WORKER_STOPPED = threading.Event()  # Set by stop_worker: this worker stops, its trial too.
RUNNING_TRIAL: list = []  # The trial's process while one runs (singleexecutor: one at a time).
CURRENT_TRIAL: list = [None]  # The trial this worker runs (records.py's consume_and_record sets it).
WORKER_FILE = "worker.json"


def iso(moment) -> str | None:
    return moment.isoformat() if moment is not None else None


def record_worker(trial, results_path: str | None = None) -> None:
    """Writes the trial folder's worker.json: which worker runs the trial, under which reservation,
    and (once known) where its process writes its result (records.py reads it back)."""
    write_whole(Path(trial.working_dir, WORKER_FILE), json.dumps({
        "trial": trial.id, "experiment": str(trial.experiment), "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(), "pid": os.getpid(), "reserved_at": iso(trial.start_time), "results": results_path}))


def stop_worker(message: str) -> None:
    """Prints `error: message` (once), stops the running trial, and makes this worker exit 1."""
    if WORKER_STOPPED.is_set():
        return
    WORKER_STOPPED.set()
    with OUTAGE_SAID:
        LAST_LINE_SAID.set()
        print(f"error: {message}", file=sys.stderr, flush=True)
    for process in list(RUNNING_TRIAL):
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
            try:
                process.wait(timeout=orion.core.config.worker.heartbeat / 2)
            except subprocess.TimeoutExpired:
                process.kill()


def reservation(trial) -> dict:
    """The query that matches `trial` only while it is reserved by the reservation this worker holds."""
    return {"status": "reserved", "start_time": trial.start_time}


def update_heartbeat_of_this_reservation(self, trial) -> int:
    """Oríon's `Legacy.update_heartbeat`, into this worker's reservation only."""
    return self.update_trial(trial, heartbeat=datetime.datetime.utcnow(), where=reservation(trial))


def status_of(storage, trial) -> str:
    """The trial's status in the database ("missing" if it is not there any more)."""
    current = storage.get_trial(trial)
    return current.status if current is not None else "missing"


def set_status_of_this_reservation(self, trial, status, heartbeat=None, was=None) -> None:
    """Oríon's `Legacy.set_trial_status`; releasing a reserved trial (was="reserved") only from this
    worker's own reservation, not from the worker that runs it now."""
    was = was or trial.status
    validate_status(status)
    validate_status(was)
    where = reservation(trial) if was == "reserved" and trial.start_time is not None else {"status": was}
    if not self.update_trial(trial, status=status, heartbeat=heartbeat or datetime.datetime.utcnow(),
                             experiment=trial.experiment, where=where):
        status = status_of(self, trial)
        # Oríon's runner would end in a traceback (RuntimeError): one line instead. (A trial gone
        # from the database is Oríon's ValueError, as it is.)
        if was == "reserved" and status != "missing":
            stop_worker(f"trial {trial.id} is {status} now, no longer reserved by this worker: another worker took "
                        "it for lost meanwhile (was this worker stalled?); this worker exits")
        raise FailedUpdate()
    trial.status = status


def push_results_of_this_reservation(self, trial) -> int:
    """Oríon's `Legacy.push_trial_results` (the trial, completed, with its results), into this worker's
    reservation, or into a trial no one holds any more (taken for lost meanwhile: its result is
    kept); not over another worker's reservation, nor over a finished trial."""
    for where in (reservation(trial), {"status": {"$in": ["interrupted", "new", "suspended"]}}):
        updated = self.update_trial(trial, **trial.to_dict(), where=where)
        if updated:
            return updated
    status = status_of(self, trial)
    if status == "missing":  # Oríon's ValueError, as it is.
        raise FailedUpdate()
    stop_worker(f"trial {trial.id} ended in this worker, but another worker had taken it for lost meanwhile (was "
                "this worker stalled?) and " + ("runs it now: this result is not recorded" if status == "reserved" else
                                                f"it is {status} now (a completed one with this run's result, found "
                                                "in its folder, or its own)") + "; this worker exits")
    raise FailedUpdate()


def beat(self) -> None:
    """Oríon's `TrialPacemaker.run`: the heartbeat of a running trial, as described above."""
    interval = orion.core.config.worker.heartbeat
    late = None  # (since, why) while the heartbeat cannot be written
    while not self.stopped.wait(interval if late is None else 1.0):
        try:
            ours = self.storage.update_heartbeat(self.trial)
        except DatabaseLockError as error:  # Not a wait: the database cannot be used as it is.
            stop_worker(str(error))
            return
        except Exception as error:  # Should `patiently` not wait it out: tried again.
            if late is None:
                late = (time.monotonic(), f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
                print(f"warning: the heartbeat of trial {self.trial.id} cannot be written ({late[1]}); the trial runs "
                      "on, and the heartbeat is tried again every second", file=sys.stderr, flush=True)
            continue
        if late is not None:
            print(f"The heartbeat of trial {self.trial.id} is written again, after {time.monotonic() - late[0]:.0f} s",
                  file=sys.stderr, flush=True)
            late = None
        if ours:
            continue
        # No longer reserved by us. Once the trial's process has ended, this worker is releasing it
        # (completed, broken, interrupted) and is about to stop this thread: nothing to say.
        if RUNNING_TRIAL:
            status = status_of(self.storage, self.trial)
            stop_worker(f"trial {self.trial.id} is {status}{' by another worker' if status == 'reserved' else ''} "
                        f"while it runs here: another worker took it for lost (its heartbeat stood still for 5 x "
                        f"ORION_HEARTBEAT = {5 * interval} s: was this worker stalled?); this worker stopped it "
                        "and exits")
        return


# A trial killed with SIGKILL (the kernel's out-of-memory killer, `scancel --signal=KILL`) became
# `broken` and counted toward max_broken, like a failure of main.py itself. The cluster ended it,
# not main.py: it becomes `interrupted`, resumed later from its last checkpoint, and this worker
# stops (its job says why), so a configuration that always exhausts the host's memory costs each
# worker one try, not a loop. See docs/preemption.md.
def run_trial(self, cmd_args, environ) -> None:
    """Oríon's `Consumer.execute_process` (the trial's command), where a SIGKILL means `interrupted`,
    not `broken`, and whose process stop_worker can stop."""
    if WORKER_STOPPED.is_set():  # Oríon's runner reserved this trial after stop_worker: not run, resumed later.
        raise ExecutionError(orion.core.config.worker.interrupt_signal_code)
    trial = CURRENT_TRIAL[0]
    # The trial's process stops if another worker takes the trial over (trial_support/reservation.py);
    # and should this worker die before it records the result, the next one finds it (records.py).
    environ = {**environ, "ORION_TOOLS_RESERVED_AT": (iso(trial.start_time) if trial is not None else None) or ""}
    if trial is not None:
        # A worker stalled since it reserved the trial may have lost it: then it neither starts it nor
        # writes worker.json over the new run's (the trial's process there would take it as taken over).
        reserved = trial.status == "reserved" and trial.start_time is not None  # As Oríon's workers reserve.
        if reserved and not self.experiment._storage.update_heartbeat(trial):
            stop_worker(f"trial {trial.id} is {status_of(self.experiment._storage, trial)} now, no longer reserved by "
                        "this worker: another worker took it for lost before it could start it (was this worker "
                        "stalled?); this worker exits")
            raise ExecutionError(orion.core.config.worker.interrupt_signal_code)
        record_worker(trial, environ.get("ORION_RESULTS_PATH"))
    try:
        process = subprocess.Popen(cmd_args, env=environ)
    except PermissionError as error:
        raise InexecutableUserScript(" ".join(cmd_args)) from error
    RUNNING_TRIAL.append(process)
    RAN_A_TRIAL.set()
    if WORKER_STOPPED.is_set():  # stop_worker ran between the check above and the append.
        process.terminate()
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
