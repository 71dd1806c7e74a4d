"""What job.sh asks of Oríon's database, beyond `orion hunt`: one subcommand per task.

    python orion_tools.py hunt -n NAME --config FILE ... python main.py ...   # orion hunt, exact budget
    python orion_tools.py reclaim --experiment NAME --trials-dir DIR --job-id ID --since EPOCH
    python orion_tools.py check-database                       # refuse an emptied database, back it up
    python orion_tools.py summary [--experiment NAME]       # trials by status, best so far: 2 lines
    python orion_tools.py report [--experiment NAME] [--trials-dir DIR] [--output DIR] [--if-done]

The database is the PickledDB file of --database (default: $ORION_DB_ADDRESS, which job.sh
exports). To add a subcommand, write a function `name(args) -> exit code` and its parser
in `parse_args`.
"""

import argparse
import collections
import datetime
import json
import os
import pickle
import re
import shutil
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



def hunt(hunt_arguments: list[str]) -> int:
    """`orion hunt ARGUMENTS...` that runs exactly max_trials trials, whatever the number of workers.

    A worker with nothing left to run exits 0 at once.
    """
    Producer.produce = produce_within_budget
    Experiment.is_done = property(done_within_budget)
    return orion.core.cli.main(["hunt", *hunt_arguments]) or 0


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
        print("\n".join(summary_lines(experiment, trials)))
        print(f"The search is not done: no report yet (make one now with: python orion_tools.py report "
              f"--experiment {args.experiment} --database {args.database} --trials-dir {trials_dir_of(args)})")
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
        lines += [f"Best objective: {best.objective.value:.4f} (1 - validation accuracy)",
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
# file as an empty database (`orion status`: "No experiment found"; a new hunt starts over).


def check_database(args) -> int:
    """Refuses an empty or unreadable database (exit 1, and how to recover); else backs it up.

    The backup, `<database>.bak`, is the last copy that a job found readable.
    """
    database, backup = Path(args.database), Path(f"{args.database}.bak")
    if not database.exists():
        return 0  # A new search.
    problem = None
    if database.stat().st_size == 0:
        problem = "is empty"
    else:
        try:
            with open(database, "rb") as file:
                pickle.load(file)
        except Exception as error:  # Truncated, or not a pickle at all.
            problem = f"is not readable ({type(error).__name__}: {error})"
    if problem:
        recovery = (f"restore the last good copy: cp {backup} {database}" if backup.is_file()
                    else "no backup exists: move it away to start a new search")
        print(f"error: the Oríon database {database} {problem}; {recovery}", file=sys.stderr)
        return 1
    temporary = backup.with_name(f"{backup.name}.{os.getpid()}.tmp")
    shutil.copyfile(database, temporary)
    os.replace(temporary, backup)  # Several jobs may back up at once: each rename is whole.
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

    command = subcommands.add_parser("check-database", parents=[common], help=check_database.__doc__.split("\n")[0])
    command.set_defaults(run=check_database)

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
