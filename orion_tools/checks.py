"""`check-database` (never start a search over from an emptied database) and `check-experiment`
(one experiment, one set of settings; priors within what main.py accepts).
"""

import contextlib
import io
import os
import pickle
import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

from orion.core.utils.exceptions import NoConfigurationError

from .database import storage, temporary_path

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
    temporary = temporary_path(backup_path)  # Two jobs with one pid (other nodes, containers) must not collide.
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
    from orion.core.io.orion_cmdline_parser import OrionCmdlineParser
    from orion.core.io.space_builder import SpaceBuilder
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
    from orion.core.io.space_builder import SpaceBuilder
    arguments, priors = split_priors(argv)
    why = parse_args_refusal(main, arguments)
    if why:
        print(f"error: main.py refuses the arguments after job.sh ({why}): correct them and submit again",
              file=sys.stderr)
        sys.exit(2)
    for name, prior in priors.items():
        try:
            [dimension] = SpaceBuilder().build({name.lstrip("-"): prior}).values()
        except Exception:
            continue  # A malformed prior: check-experiment says why, in step 4.
        ends = dimension.interval() if dimension.type != "categorical" else dimension.categories
        for value in ends:
            why = parse_args_refusal(main, [*arguments, f"{name}={value}"])
            if why and "unrecognized arguments" in why:
                print(f"error: the prior {name}~'{prior}' in job.sh names no argument of main.py ({why}): correct "
                      "its name in job.sh's priors, or add the argument to main.py's parse_args", file=sys.stderr)
                sys.exit(2)
            if why:
                hint = (" (an integer argument needs a prior of whole numbers: add discrete=True)"
                        if "invalid integer value" in why else "")
                print(f"error: the prior {name}~'{prior}' in job.sh reaches {value}, which main.py refuses ({why}): "
                      f"keep its range within what main.py's parse_args accepts{hint}", file=sys.stderr)
                sys.exit(2)
    print(main.dataset.__file__)


def parse_args_refusal(main, argv: list[str]) -> str | None:
    """Why main.py's parse_args refuses these arguments, from its one error line (None: it accepts them)."""
    refused = io.StringIO()
    try:
        with contextlib.redirect_stderr(refused):
            main.parse_args(argv)
    except SystemExit as exit:
        if exit.code in (0, None):  # --help.
            return "--help: job.sh runs trials, it shows no help"
        return refused.getvalue().strip().removeprefix("main.py: error: ").removesuffix(" (see --help)")
    return None



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
    from orion.client import get_experiment  # Here: check-database needs none of Oríon's client.
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


