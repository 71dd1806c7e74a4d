"""The command line: one subcommand per task of job.sh (`python -m orion_tools --help`).
"""

import argparse
import os
import sys

from .stage import stage_data


def add_stage_data(subcommands) -> None:
    command = subcommands.add_parser("stage-data", help=stage_data.__doc__.split("\n")[0])
    command.set_defaults(run=stage_data)
    command.add_argument("--module", required=True, help="the data set module's file (main.py's `dataset`)")
    command.add_argument("--destination", required=True, help="the node's local folder: $SLURM_TMPDIR/data")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a subparser per subcommand, which names its function in `run`."""
    from .checks import check_database, check_experiment
    from .records import job_verdict, reclaim
    from .reporting import report, summary
    from .worker import hunt
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database", default=os.environ.get("ORION_DB_ADDRESS"),
                        required="ORION_DB_ADDRESS" not in os.environ,
                        help="the PickledDB file (default: $ORION_DB_ADDRESS)")
    parser = argparse.ArgumentParser(prog="python -m orion_tools", description="What job.sh does in Python, beyond `orion hunt` itself: one subcommand per task.")
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

    add_stage_data(subcommands)

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
    if argv[:1] == ["stage-data"]:  # On each node, before the workers: no Oríon to import.
        parser = argparse.ArgumentParser(prog="python -m orion_tools")
        add_stage_data(parser.add_subparsers(required=True))
        args = parser.parse_args(argv)
        return args.run(args)
    from . import patches
    from .database import DatabaseLockError, ReportError
    from .worker import hunt
    # No torch in these processes: the trial, a process of its own, imports it. Oríon would
    # import it twice over, for nothing: in its CLI (see `hunt`) and when it looks up an
    # algorithm by name (it loads every algorithm's module, PB2's too, whose RNG helper
    # `orion.core.utils.random_state` saves torch's RNG state if it can import torch; TPE,
    # ASHA and random use numpy's). `None` here makes that import fail, as Oríon expects
    # where torch is not installed. Left alone where torch is already imported (the tests).
    sys.modules.setdefault("torch", None)
    patches.install(patches.DATABASE)
    if argv[:1] == ["hunt"]:  # argparse would take `orion hunt`'s options as its own.
        return hunt(argv[1:])
    args = parse_args(argv)
    try:
        return args.run(args)
    except (ReportError, DatabaseLockError) as error:  # One line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1


