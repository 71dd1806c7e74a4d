"""The command line: one subcommand per task of job.sh (`python -m orion_tools --help`).
"""

import argparse
import importlib
import os
import sys

from . import load_orion

# Each subcommand's function, imported only when that subcommand runs (or for --help): Oríon's
# client takes 1.7 s of CPU to import, and what every job runs at its start, on each node
# (stage-data) or once (check-database), and at its end (job-verdict) needs none of it.
SUBCOMMANDS = {
    "reclaim": "records", "job-verdict": "verdict", "stage-data": "stage", "check-database": "checks",
    "check-experiment": "checks", "summary": "reporting", "report": "reporting", "hunt": "worker",
}
NEEDS_NO_ORION_CLIENT = {"stage-data", "check-database", "job-verdict"}


def handler(name: str):
    return getattr(importlib.import_module(f".{SUBCOMMANDS[name]}", __package__), name.replace("-", "_"))


def parse_args(argv=None) -> argparse.Namespace:
    """The command line: a subparser per subcommand (only the one named, if any), which names its
    function in `run`."""
    argv = sys.argv[1:] if argv is None else argv
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database", default=os.environ.get("ORION_DB_ADDRESS"),
                        required="ORION_DB_ADDRESS" not in os.environ,
                        help="the PickledDB file (default: $ORION_DB_ADDRESS)")
    reading = argparse.ArgumentParser(add_help=False, parents=[common])
    reading.add_argument("--experiment", default=os.environ.get("ORION_EXPERIMENT", "orion-example"),
                         help="the experiment's name (default: $ORION_EXPERIMENT, or orion-example)")
    parser = argparse.ArgumentParser(prog="python -m orion_tools", description="What job.sh does in Python, beyond `orion hunt` itself: one subcommand per task.")
    subcommands = parser.add_subparsers(required=True)

    def add(name: str, parents: list, suffix: str = ""):
        run = handler(name)
        command = subcommands.add_parser(name, parents=parents, help=run.__doc__.split("\n")[0] + suffix)
        command.set_defaults(run=run)
        return command

    named = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if named in (None, "reclaim"):
        command = add("reclaim", [common])
        command.add_argument("--experiment", required=True, help="the experiment's name")
        command.add_argument("--trials-dir", required=True, help="orion hunt's --working-dir")
        command.add_argument("--job-id", required=True, help="this job's $SLURM_JOB_ID")
        command.add_argument("--since", required=True, type=float,
                             help="when this run of the job started, in seconds since the epoch")
    if named in (None, "job-verdict"):
        command = add("job-verdict", [common])
        command.add_argument("--worker-records", required=True, help="hunt's --worker-records of this job")
        command.add_argument("--hunt-status", required=True, type=int, help="the workers' exit status")
        command.add_argument("--experiment", required=True, help="the experiment's name")
        command.add_argument("--trials-dir", help="orion hunt's --working-dir (default: <database folder>/<experiment>)")
    if named in (None, "stage-data"):
        command = add("stage-data", [])
        command.add_argument("--module", required=True, help="the data set module's file (main.py's `dataset`)")
        command.add_argument("--destination", required=True, help="the node's local folder: $SLURM_TMPDIR/data")
    if named in (None, "check-database"):
        command = add("check-database", [common])
        command.add_argument("--experiment", help="the experiment whose completed trials the backup must not outnumber")
    if named in (None, "check-experiment"):
        command = add("check-experiment", [common])
        command.add_argument("--experiment", required=True, help="the experiment's name")
        command.add_argument("--algorithm", required=True,
                             help="the algorithm this job would configure, as YAML: 'tpe: {seed: null}'")
        command.add_argument("trial_command", nargs="+", metavar="-- python main.py ...",
                             help="the trial command given to `orion hunt`, priors included")
    if named in (None, "summary"):
        add("summary", [reading])
    if named in (None, "report"):
        command = add("report", [reading])
        command.add_argument("--trials-dir", help="orion hunt's --working-dir (default: <database folder>/<experiment>)")
        command.add_argument("--output", help="the report's folder (default: <database folder>/<experiment>-report)")
        command.add_argument("--if-done", action="store_true",
                             help="only once all max_trials trials completed; before, print the summary only")
    if named is None:  # hunt: everything after it goes to `orion hunt` as it is (see `main`).
        add("hunt", [], " (takes what `orion hunt` takes)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .database import DatabaseLockError, ReportError
    if not (argv[:1] and argv[0] in NEEDS_NO_ORION_CLIENT):
        load_orion()
        if argv[:1] == ["hunt"]:  # argparse would take `orion hunt`'s options as its own.
            return handler("hunt")(argv[1:])
    args = parse_args(argv)
    try:
        return args.run(args)
    except (ReportError, DatabaseLockError) as error:  # One line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1
