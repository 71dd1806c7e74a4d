"""How long TPE holds the algorithm lock, by experiment size: the ceiling of a TPE search.

Oríon lets one worker at a time use the algorithm: to suggest a trial (`produce`) and to show
it a result (`observe`), a worker takes the experiment's algorithm lock, loads the algorithm's
state from the database, works, and saves the state back. Whatever the number of workers, a
search therefore completes at most 1 / (produce hold + observe hold) trials per second: its
ceiling. TPE looks at every completed trial each time, so both holds grow with the experiment.

For each size N, a fresh PickledDB (in the temporary folder, ext4 here) gets an experiment
with job.sh's two priors (learning rate, weight decay), TPE (seed 1, Oríon's defaults
otherwise), and N completed trials with random parameters and objectives, written in one go;
a first suggestion shows them all to the algorithm (not timed). Then --repeats times: a
suggestion (`produce`, through orion_tools.produce_within_budget, as a worker runs it) and the
result of that trial (`observe`, orion_tools.observe_patiently), each hold timed from the
moment the lock is taken and the state loaded (unpickled) to the moment the release is
written (the state pickled and saved: one database operation, which reads and writes the
whole file). What other workers wait for is this plus the state's load.

Two ways, in the same process, alternating: "Oríon's copies" (Oríon 0.2.7 as it is: its
algorithm wrappers and registry copy the state with `copy.deepcopy`) and "orion_tools"
(what `python -m orion_tools hunt` installs: `install_fast_algorithm_copies`, the same copies by a
pickle round trip). Medians of the repeats.

    uv run python benchmarks/tpe_lock.py [--quick] [--sizes 100 500 2000 5000] [--repeats 5] [--json FILE]
"""

import contextlib
import copy
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common

import orion_tools  # After common: it puts the repo root on sys.path.
import orion.algo.base.registry
import orion.core.worker.algo_wrappers.algo_wrapper
import orion.core.worker.algo_wrappers.insist_suggest
from orion.client import build_experiment
from orion.core.utils.format_trials import dict_to_trial
from orion.core.worker.producer import Producer
from orion.core.worker.trial import Trial
from orion.storage.legacy import Legacy

SPACE = {"learning_rate": "loguniform(1e-5, 1.0)", "weight_decay": "loguniform(1e-6, 1e-1)"}  # job.sh's priors when measured.
COPYING_MODULES = (orion.algo.base.registry, orion.core.worker.algo_wrappers.algo_wrapper,
                   orion.core.worker.algo_wrappers.insist_suggest)
HOLDS: list = []  # Seconds of each algorithm-lock hold, appended by `timed_algorithm_lock`.


@contextlib.contextmanager
def timed_algorithm_lock(self, *args, **kwargs):
    """orion_tools.algorithm_lock, timing each hold from the state loaded to the release written."""
    with orion_tools.algorithm_lock(self, *args, **kwargs) as state:
        started = time.perf_counter()
        yield state
        # The release (the state pickled and written) happens in algorithm_lock's `finally`.
    HOLDS.append(time.perf_counter() - started)


def use_copies(way: str) -> None:
    if way == "orion_tools":
        orion_tools.install_fast_algorithm_copies()
    else:
        for module in COPYING_MODULES:
            module.copy = copy


def experiment_with(n_trials: int, folder: Path):
    """A TPE experiment on folder/orion_db.pkl with `n_trials` completed trials, shown to the algorithm."""
    experiment = build_experiment(
        "tpe-lock", space=SPACE, algorithm={"tpe": {"seed": 1}}, max_trials=n_trials + 1000,
        storage=orion_tools.storage(str(folder / "orion_db.pkl")))
    rng = random.Random(n_trials)
    now = time.time()
    trials = []
    for i in range(n_trials):
        trial = dict_to_trial({"learning_rate": 10 ** rng.uniform(-5, 0), "weight_decay": 10 ** rng.uniform(-6, -1)},
                              experiment.space)
        trial.experiment = experiment.id
        trial.exp_working_dir = str(folder)
        trial.status = "completed"
        trial.submit_time = trial.start_time = trial.end_time = experiment._experiment.metadata["datetime"]
        trial.results = [Trial.Result(name="objective", type="objective", value=rng.random())]
        trials.append(trial.to_dict())
    database = experiment._experiment._storage._db
    with database.locked_database(write=True) as memory:  # One write of the file for all trials.
        for document in trials:
            memory.write("trials", document)
    print(f"  {n_trials} trials written in {time.time() - now:.1f} s", flush=True)
    started = time.time()
    trial = experiment.suggest()  # Shows the N trials to the algorithm (produce_within_budget).
    experiment.observe(trial, [{"name": "objective", "type": "objective", "value": 0.5}])
    print(f"  first suggestion and result (all {n_trials} trials shown to TPE) in {time.time() - started:.1f} s",
          flush=True)
    return experiment


def measure(n_trials: int, way: str, repeats: int, root: Path) -> dict:
    folder = root / f"{way}-{n_trials}"
    folder.mkdir(parents=True)
    use_copies(way)
    experiment = experiment_with(n_trials, folder)
    produce, observe = [], []
    for _ in range(repeats):
        HOLDS.clear()
        trial = experiment.suggest()
        produce.append(sum(HOLDS))
        HOLDS.clear()
        experiment.observe(trial, [{"name": "objective", "type": "objective", "value": random.random()}])
        observe.append(sum(HOLDS))
    db_bytes = (folder / "orion_db.pkl").stat().st_size
    shutil.rmtree(folder)
    result = {"trials": n_trials, "copies": way, "produce_hold_s": statistics.median(produce),
              "observe_hold_s": statistics.median(observe), "produce_holds": produce, "observe_holds": observe,
              "db_bytes": db_bytes}
    result["ceiling_trials_per_s"] = 1 / (result["produce_hold_s"] + result["observe_hold_s"])
    return result


def main():
    parser = common.argument_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000],
                        help="completed trials in the experiment, one row each (default 100 500 2000)")
    parser.add_argument("--repeats", type=int, default=5, help="suggestions and results timed per row (default 5)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.repeats = [30], 2
    if min(args.sizes) < 1 or args.repeats < 1:
        parser.error("--sizes and --repeats must be at least 1")
    common.print_header("TPE's algorithm-lock holds by experiment size", args)
    Producer.produce = orion_tools.produce_within_budget
    Producer.observe = orion_tools.observe_patiently
    Legacy.acquire_algorithm_lock = timed_algorithm_lock
    root = Path(tempfile.mkdtemp(prefix="tpe-lock-"))
    rows = []
    try:
        for n_trials in args.sizes:
            for way in ("Oríon's copies", "orion_tools"):
                print(f"{n_trials} trials, {way}:", flush=True)
                rows.append(measure(n_trials, way, args.repeats, root))
                r = rows[-1]
                print(f"  produce {r['produce_hold_s']:.3f} s, observe {r['observe_hold_s']:.3f} s: "
                      f"at most {r['ceiling_trials_per_s']:.2f} trials/s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    table = [[r["trials"], r["copies"], r["produce_hold_s"], r["observe_hold_s"], r["ceiling_trials_per_s"],
              r["db_bytes"] / 1e6] for r in rows]
    common.print_table("Algorithm-lock holds (median), TPE", ["trials", "copies", "produce hold s", "observe hold s",
                                                              "ceiling trials/s", "database MB"], table)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "python": sys.version, "cpu": common.cpu_model(),
                                         "cpus": common.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
