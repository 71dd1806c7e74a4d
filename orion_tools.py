"""What job.sh asks of Oríon's database, beyond `orion hunt`: one subcommand per task.

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

from orion.client import get_experiment
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
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
