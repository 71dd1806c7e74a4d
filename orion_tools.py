"""What job.sh asks of Oríon's database, beyond `orion hunt`: one subcommand per task.

    python orion_tools.py hunt -n NAME --config FILE ... python main.py ...   # orion hunt, exact budget
    python orion_tools.py reclaim --experiment NAME --trials-dir DIR --job-id ID --since EPOCH

The database is the PickledDB file of --database (default: $ORION_DB_ADDRESS, which job.sh
exports). To add a subcommand, write a function `name(args) -> exit code` and its parser
in `parse_args`.
"""

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import orion.core
import orion.core.cli
from orion.client import get_experiment
from orion.core.io.database import DuplicateKeyError
from orion.core.worker.experiment import Experiment
from orion.core.worker.producer import Producer
from orion.core.utils.exceptions import NoConfigurationError
from orion.storage.base import FailedUpdate  # Not in orion.core.utils.exceptions.

# main.py logs this line when a trial starts (or resumes) in a Slurm job.
SLURM_JOB_LINE = re.compile(r"Running in Slurm job (\S+) on")


def storage(database: str) -> dict:
    """Oríon's storage configuration for a PickledDB file."""
    return {"type": "legacy", "database": {"type": "pickleddb", "host": database}}


def last_slurm_job(train_log: Path) -> str | None:
    """The Slurm job that last ran a trial, from its train.log (None: no log or no such line)."""
    if not train_log.exists():
        return None
    # A log cut mid-character by a kill is not valid UTF-8: that must not fail the job.
    jobs = SLURM_JOB_LINE.findall(train_log.read_text(encoding="utf-8", errors="replace"))
    return jobs[-1] if jobs else None


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
    worker has touched it since), and the last "Running in Slurm job" line of its train.log
    names this job.
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
        if last_slurm_job(Path(args.trials_dir, trial.id, "train.log")) != args.job_id:
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
# "Oríon quirks"). Broken trials do not count: the search replaces them, up to max_broken.


def trials_left(experiment) -> int:
    """How many more trials the budget (max_trials) allows: every trial counts but broken ones."""
    counted = [trial for trial in experiment.fetch_trials(with_evc_tree=False) if trial.status != "broken"]
    return experiment.max_trials - len(counted)


def produce_within_budget(self, pool_size, timeout=60, retry_interval=1) -> int:
    """Oríon's `Producer.produce`, suggesting no more trials than the budget has left."""
    produced = 0
    with self.experiment.acquire_algorithm_lock(timeout=timeout, retry_interval=retry_interval) as algorithm:
        left = trials_left(self.experiment)  # Counted under the lock: no other worker produces meanwhile.
        for trial in algorithm.suggest(min(pool_size, left)) if left > 0 else []:
            try:
                self.experiment.register_trial(trial)
                produced += 1
            except DuplicateKeyError:  # The algorithm suggested a trial it had already.
                pass
    return produced


def done_within_budget(self) -> bool:
    """Oríon's `is_done`, or: the budget is used up and no trial is waiting for a worker.

    A waiting trial is `new`, `interrupted` (preempted), or `reserved` by a worker that died
    (no heartbeat for 5 x ORION_HEARTBEAT: Oríon then hands it out again).
    """
    if ORIONS_IS_DONE.fget(self):
        return True
    lost_before = datetime.datetime.utcnow() - datetime.timedelta(seconds=5 * orion.core.config.worker.heartbeat)
    waiting = [
        trial for trial in self.fetch_trials(with_evc_tree=False)
        if trial.status in ("new", "interrupted")
        or (trial.status == "reserved" and trial.heartbeat is not None and trial.heartbeat <= lost_before)
    ]
    return trials_left(self) <= 0 and not waiting


ORIONS_IS_DONE = Experiment.is_done


def hunt(hunt_arguments: list[str]) -> int:
    """`orion hunt ARGUMENTS...` that runs exactly max_trials trials, whatever the number of workers.

    A worker with nothing left to run exits 0 at once.
    """
    Producer.produce = produce_within_budget
    Experiment.is_done = property(done_within_budget)
    return orion.core.cli.main(["hunt", *hunt_arguments]) or 0


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

    # hunt: everything after it goes to `orion hunt` as it is (see `main`).
    subcommands.add_parser("hunt", help=hunt.__doc__.split("\n")[0] + " (takes what `orion hunt` takes)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hunt"]:  # argparse would take `orion hunt`'s options as its own.
        return hunt(argv[1:])
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
