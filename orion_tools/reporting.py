"""`summary` and `report`: what the search found, read-only beside the workers: trials by
status, the best, epochs and device time, Oríon's plots and the learning curves, as PNG offline.
"""

import collections
import datetime
import hashlib
import json
import os
import sys
from pathlib import Path

from .database import HOST, open_experiment, temporary_path, trials_dir_of, write_whole

# --- summary and report: what the search found ------------------------------------------------
# Read-only: they open the experiment in Oríon's "r" mode, so they run alongside the workers.
# A trial's folder, <trials dir>/<trial id>/, holds main.py's metrics.jsonl (one record per
# epoch). An ASHA promotion starts in a copy of its parent's folder: the parent's records appear
# again, identical (same end_time), in the child's file; counted once (`unique_epochs`).

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
    """All max_trials trials completed (orion_tools hunt runs exactly that many)."""
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
    """The objective (what main.py reports, under its name) against epochs, from each trial's
    metrics.jsonl: one line per trial with metrics, the best one bold; epoch 0 is the untrained model."""
    import plotly.graph_objects as go

    best = best_trial(trials)
    max_epoch = max((r["epoch"] + 1 for records in metrics.values() for r in records), default=0)
    names = {result.name for trial in trials for result in trial.results if result.type == "objective"}
    name = names.pop() if len(names) == 1 else "objective"
    figure = go.Figure()
    for trial in trials:
        records = sorted(metrics.get(trial.id, []), key=lambda r: r["epoch"])
        if not records:
            continue
        is_best = best is not None and trial.id == best.id
        untrained = [(0, records[0].get("untrained_objective"))] if records[0].get("epoch") == 0 else []
        points = untrained + [(r["epoch"] + 1, r.get("objective")) for r in records]
        figure.add_trace(go.Scatter(
            x=[x for x, _ in points], y=[y for _, y in points],
            mode="lines+markers", name=f"{trial.id[:8]} ({trial.status})" + (" best" if is_best else ""),
            line=dict(width=4 if is_best else 1.5), marker=dict(size=6 if is_best else 4),
            opacity=1.0 if is_best else 0.6,
        ))
    figure.update_layout(title=f"Learning curves: {name} per epoch (Oríon minimizes it), one line per trial",
                         xaxis_title="Epochs trained", yaxis_title=name,
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


def report_claim(output: Path, trials) -> Path:
    """The file that says who reports these trials as they stand (ids, statuses, ends)."""
    state = sorted((trial.id, trial.status, str(trial.end_time)) for trial in trials)
    return output / f".report-of-{hashlib.sha1(json.dumps(state).encode()).hexdigest()[:16]}"


def first_to_report(claim: Path) -> bool:
    """Whether this process is the first to report (`report_claim`): it creates the file
    exclusively, one winner, on NFS too. A search extended later is another state."""
    try:
        with open(claim, "x") as file:
            file.write(f"{slurm_job()}process {os.getpid()} on {HOST}")
        return True
    except FileExistsError:
        return False


def slurm_job() -> str:
    """'Slurm job 12_3, ' (an array's task), 'Slurm job 12, ', or '' outside Slurm."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"Slurm job {os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}, "
    return f"Slurm job {os.environ['SLURM_JOB_ID']}, " if os.environ.get("SLURM_JOB_ID") else ""


def claimed_by(claim: Path) -> str:
    try:
        return claim.read_text() or "another process"
    except OSError:
        return "another process"


def write_png(figure, path: Path) -> None:
    """Writes the figure as PNG through kaleido, all at once (readers never see half a file)."""
    temporary = temporary_path(path.with_name(f".{path.name}"))
    figure.write_image(str(temporary), format="png", width=figure.layout.width or 1000,
                       height=figure.layout.height or 600)
    os.replace(temporary, path)


def report(args) -> int:
    """Writes the search's report (plots as PNG and summary.txt) and prints its summary."""
    experiment, trials = open_experiment(args)
    if args.if_done and not is_done(experiment, trials):
        # The summary last: a job's output ends with where the search stands (README).
        print(f"The search is not done: no report yet (make one now with: uv run python -m orion_tools report "
              f"--experiment {args.experiment} --database {args.database} --trials-dir {trials_dir_of(args)})")
        print("\n".join(summary_lines(experiment, trials)))
        return 0
    trials_dir = trials_dir_of(args)
    if not trials_dir.is_dir():
        print(f"warning: no trial folders in {trials_dir}: no learning curves or epochs; pass --trials-dir "
              "(orion hunt's --working-dir)", file=sys.stderr)
    output = Path(args.output) if args.output else Path(args.database).parent / f"{args.experiment}-report"
    output.mkdir(parents=True, exist_ok=True)
    if args.if_done and not first_to_report(claim := report_claim(output, trials)):
        # Every task of an array ends once the search is done, most at the same moment: each made
        # the same plots (Chromium, half a minute of a GPU job's time), all but one for nothing.
        print(f"The report of this search is made once, by {claimed_by(claim)}, in {output} (if it is "
              f"not there, make it with: uv run python -m orion_tools report --experiment {args.experiment} "
              f"--database {args.database} --trials-dir {trials_dir})")
        print("\n".join(summary_lines(experiment, trials)))
        return 0
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
        lines += [f"Best objective: {best.objective.value:.4f} ({best.objective.name})",
                  f"Best hyperparameters: {format_params(best)}",
                  f"Best trial: {best.id}, folder {trials_dir / best.id}"]
    lines.append(f"Epochs trained: {len(epochs)} (in {sum(bool(r) for r in metrics.values())} trial folders; "
                 f"an epoch copied into a promoted trial's folder counts once)")
    lines.append(f"Device time (training + validation): {seconds / 3600:.2f} h ({seconds:.0f} s on {devices})")
    lines.append(f"Files in {output}:")
    lines += [f"  {name}" for name in [*written, "summary.txt"]]
    lines += [f"  {line}" for line in not_made]
    text = "\n".join(lines) + "\n"
    write_whole(output / "summary.txt", text)
    print(text, end="")
    if failed:
        print("error: some plots of the report failed (see above)", file=sys.stderr)
    print(f"Report: {output}")
    return 1 if failed else 0


