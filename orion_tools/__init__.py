"""What job.sh does in Python, beyond `orion hunt` itself: one subcommand per task.

    python -m orion_tools hunt [--worker-records DIR] -n NAME --config FILE ... python main.py ...
                                                  # orion hunt, exact budget; records what it ran
    python -m orion_tools reclaim --experiment NAME --trials-dir DIR --job-id ID --since EPOCH
    python -m orion_tools job-verdict --worker-records DIR --hunt-status N [--experiment NAME]
                                                  # what a job ran, its exit code
    python -m orion_tools stage-data --module cifar10.py --destination DIR   # the data set, on a node
    python -m orion_tools check-database [--experiment NAME]   # refuse an emptied database, back it up
    python -m orion_tools check-experiment --experiment NAME --algorithm YAML -- python main.py ...
                                                  # refuse a bad prior, or a rerun with other settings
    python -m orion_tools summary [--experiment NAME]       # trials by status, best so far: 2 lines
    python -m orion_tools report [--experiment NAME] [--trials-dir DIR] [--output DIR] [--if-done]

The database is the PickledDB file of --database (default: $ORION_DB_ADDRESS, which job.sh
exports). One module per concern; each imports only those above it in this list:

    database.py        the database lock (kernel lock or lease), writes fenced by generation, patient operations,
                       whole files, the experiment read-only
    lost_trials.py     when a reserved trial counts as lost
    algorithm_lock.py  the algorithm lock: renewed, taken over, fenced; the algorithm state's copies
    budget.py          an exact budget, results shown as they come, the end of the search
    heartbeat.py       a running trial's heartbeat, its process, a worker that stops in one line
    records.py         worker records, reclaim
    verdict.py         job-verdict
    reporting.py       summary and report
    checks.py          check-database, check-experiment
    stage.py           stage-data
    patches.py         every Oríon function replaced, in one list (docs/orion-patches.md: why, and the tests)
    worker.py          hunt: Oríon's hunt with the patches installed
    cli.py             the command line

To add a subcommand, write a function `name(args) -> exit code` in its module and its parser in
cli.py's `parse_args`.
"""

import importlib
import sys

# Loaded at first use of a name (PEP 562), not at `import orion_tools`: `python -m orion_tools
# stage-data`, run on each node at the start of every job, then imports no Oríon (1.7 s of CPU).
# `orion_tools.NAME` is then what `from .MODULE import *` gave, the later module's on a clash.
MODULES = ["database", "lost_trials", "algorithm_lock", "budget", "heartbeat", "records", "verdict", "reporting",
           "checks", "stage", "patches", "worker", "cli"]
_loading = False


def load_all() -> None:
    """Imports every module (Oríon's client and CLI with them) and takes their names."""
    global _loading
    if not _loading:
        _loading = True  # A submodule's `from . import x` meanwhile imports x itself.
        for module_name in MODULES:
            module = importlib.import_module(f"{__name__}.{module_name}")
            globals().update((key, value) for key, value in vars(module).items() if not key.startswith("_"))


def load_orion() -> None:
    """Oríon's client and CLI, its database patched (database.py): what every subcommand but
    those of cli.py's NEEDS_NO_ORION_CLIENT needs before it starts (and they, should they open the database)."""
    from . import patches
    load_all()  # Oríon's client and CLI: before torch is hidden (scipy looks for it as it loads).
    # No torch in these processes: the trial, a process of its own, imports it. Oríon would
    # import it twice over, for nothing: in its CLI (see `hunt`) and when it looks up an
    # algorithm by name (it loads every algorithm's module, PB2's too, whose RNG helper
    # `orion.core.utils.random_state` saves torch's RNG state if it can import torch; TPE,
    # ASHA and random use numpy's). `None` here makes that import fail, as Oríon expects
    # where torch is not installed. Left alone where torch is already imported (the tests).
    sys.modules.setdefault("torch", None)
    patches.install(patches.DATABASE)


def __getattr__(name):
    load_all()
    if name in globals():
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
