"""A running trial's heartbeat (`beat`, every ORION_HEARTBEAT, stopping the trial before anyone
may take it for lost), the trial's process (`run_trial`), and a worker that stops in one line
(`stop_worker`).
"""

import contextlib
import math
import signal
import subprocess
import sys
import threading
import time


import orion.core
from orion.core.worker.consumer import ExecutionError
from orion.core.utils.exceptions import InexecutableUserScript

from .budget import RAN_A_TRIAL
from .database import DATABASE_LOCK_LEASE, LOCK_POLL, LOCK_WAIT, DatabaseLockError

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
