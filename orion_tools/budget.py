"""The search's budget and its end, for `hunt`'s workers: trials produced within max_trials
(`produce_within_budget`), results shown to the algorithm as they come (`observe_patiently`), the
search done when the budget is (`done_within_budget`), and the verdict of a worker left idle
(`idle_verdict`).
"""

import copy
import sys
import threading
import time


import orion.core
from orion.algo.hyperband import Hyperband
from orion.core.worker.experiment import Experiment
from orion.core.worker.trial import Trial
from orion.core.worker.warm_start.warm_starteable import is_warmstarteable

from .algorithm_lock import ALGORITHM_LOCK_TIMEOUT, AlgorithmLockLost, ObserveLater, register_within_budget
from .database import LOCK_WAIT, test_pause
from .lost_trials import looks_lost, may_be_lost, seen_alive

# --- hunt: `orion hunt`, with an exact budget ------------------------------------------------
# Oríon 0.2.7 hands out trials until `max_trials` have *completed*: W workers run up to
# max_trials + W - 1 trials, and a worker with nothing left waits a minute, then raises
# LazyWorkers. Trials are produced (suggested and registered) by one worker at a time, under
# the experiment's algorithm lock, in `Producer.produce`; we replace that method and
# `Experiment.is_done` for this process only (Oríon is dormant upstream; every
# replacement: docs/orion-patches.md). Broken trials do not count: the search replaces them, up
# to max_broken.


def trials_left(experiment, trials) -> int:
    """How many more trials the budget (max_trials) allows: every trial counts but broken ones."""
    return experiment.max_trials - sum(trial.status != "broken" for trial in trials)


def produce_within_budget(self, pool_size, timeout=None, retry_interval=1) -> int:
    """Oríon's `Producer.produce`, suggesting no more trials than the budget has left, and registering
    them only while this worker still holds the algorithm lock (algorithm_lock.py)."""
    if trials_left(self.experiment, self.experiment.fetch_trials(with_evc_tree=False)) <= 0:
        # Budget used: this worker waits for the last trials (`done_within_budget`). Oríon's
        # runner asks again at once, a dozen database operations each time: not more often.
        time.sleep(min(5.0, orion.core.config.worker.heartbeat / 4))
        return 0
    # Not Oríon's 60 s: long enough to see a stale lock (`algorithm_lock`).
    timeout = ALGORITHM_LOCK_TIMEOUT if timeout is None else timeout
    try:
        with self.experiment.acquire_algorithm_lock(timeout=timeout, retry_interval=retry_interval) as algorithm:
            # Oríon's warm start, as its own `produce` does it: an experiment given a knowledge base
            # shows a warm-starteable algorithm the related experiments' trials, once per worker.
            if self.experiment.knowledge_base and not self.warm_started and is_warmstarteable(algorithm):
                algorithm.warm_start(self.experiment.knowledge_base.get_related_trials(self.experiment.configuration))
                self.warm_started = True
            trials = self.experiment.fetch_trials(with_evc_tree=False)
            # Results the algorithm missed: their worker was killed, or took a SIGTERM, between the
            # trial's end and `observe` (see `observe_patiently`). Shown now, so that it suggests on them.
            missed = [trial for trial in trials if trial.status in ("completed", "broken")
                      and not algorithm.has_observed(trial)]
            if missed:
                algorithm.observe(as_the_algorithm_sees_them(algorithm, missed))
                shown = ", ".join(t.id for t in missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
                print(f"The algorithm sees now the result of trial(s) {shown}, which it had missed", flush=True)
            left = trials_left(self.experiment, trials)
            suggested = algorithm.suggest(min(pool_size, left)) if left > 0 else []
            test_pause("holding-algorithm")
            # The budget is counted again in the update that registers them: exact, whoever holds the lock.
            return register_within_budget(self.experiment, suggested or [])
    except AlgorithmLockLost as lost:
        print(f"warning: {lost}; this worker asks again", file=sys.stderr, flush=True)
        return 0


ORIONS_IS_DONE = Experiment.is_done  # Before `hunt` replaces it.


# The end of a search: once the budget is handed out, a worker with nothing to run used to exit
# at once, even while other workers' trials were still reserved: when the last of those workers
# died (SIGKILL, node failure), no worker was left to resume its trial once it counted as lost,
# and the search ended short, exit 0. Now a worker that has run a trial stays while any trial is
# reserved (it polls every ORION_HEARTBEAT / 4 s, at most 5 s), and resumes a trial that
# becomes lost; a worker that never got one (a spare: more workers than trials) stays until it
# has seen each reserved trial's heartbeat move (about one ORION_HEARTBEAT), since the workers
# that did get one stay. (Up to `idle_timeout`, as for any idle worker.)
RAN_A_TRIAL = threading.Event()


def done_within_budget(self) -> bool:
    """Oríon's `is_done`, or: the budget is used up, no trial is waiting for a worker, and (for a
    worker that has run a trial) no trial is still reserved by another.

    A waiting trial is `new`, `interrupted` (preempted), or `reserved` by a worker that died
    (lost_trials.py: this worker then hands it out again).
    """
    EXPERIMENT[:] = [self]
    if ORIONS_IS_DONE.fget(self):
        return True
    trials = self.fetch_trials(with_evc_tree=False)  # One read of the database for all questions.
    waiting = [trial for trial in trials if trial.status in ("new", "interrupted") or may_be_lost(trial)]
    if trials_left(self, trials) > 0 or waiting:
        return False
    reserved = [trial for trial in trials if trial.status == "reserved"]
    if RAN_A_TRIAL.is_set():
        return not reserved
    # A spare leaves once it has seen each reserved trial's heartbeat move (their workers live and
    # stay): should they all have died (a job resubmitted after its nodes failed), it stays, and
    # runs their trials once they count as lost.
    return all(seen_alive(trial) for trial in reserved)


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
        while True:
            try:
                with self.experiment.acquire_algorithm_lock(timeout=ALGORITHM_LOCK_TIMEOUT) as algorithm:
                    algorithm.observe(as_the_algorithm_sees_them(algorithm, [trial]))
                    test_pause("in-observe")
                break
            except AlgorithmLockLost as lost:  # The state this worker saved is not the stored one: again.
                print(f"warning: {lost}; this worker shows trial {trial.id} to the algorithm again", file=sys.stderr,
                      flush=True)
    except ObserveLater:
        print(f"warning: signalled while waiting for the algorithm lock: the result of trial {trial.id} is saved, "
              "and the algorithm sees it at the next suggestion", file=sys.stderr, flush=True)
    finally:
        LOCK_WAIT.unless_signalled = False



EXPERIMENT: list = []  # The experiment this worker runs, once `done_within_budget` has seen it.


def idle_verdict() -> int:
    """After LazyWorkers: 0 if nothing is left for this worker, else one line and 1."""
    experiment = EXPERIMENT[0]
    trials = experiment.fetch_trials(with_evc_tree=False)
    completed = sum(trial.status == "completed" for trial in trials)
    running = [trial for trial in trials if trial.status == "reserved" and not looks_lost(trial)]
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
           "the algorithm suggests no more trials: see `python -m orion_tools summary`")
    print(f"error: search {experiment.name} stopped at {completed} of {experiment.max_trials} completed trials, "
          f"no trial to run for idle_timeout: {why}", file=sys.stderr, flush=True)
    return 1


