"""Every Oríon 0.2.7 function this project replaces, in one place: what `install` sets, and why.

docs/orion-patches.md is the same list as a table, with the failure each replacement prevents and
the test that proves it; tests/test_patches.py checks that the table, this list and what `install`
really changes in Oríon agree. To move to another Oríon version: read each replaced function in
the new version against its row, port or drop the replacement, and the test names what is left.
"""

import copy
import types
from dataclasses import dataclass

import orion.algo.base.registry
import orion.core.worker.algo_wrappers.algo_wrapper
import orion.core.worker.algo_wrappers.insist_suggest
from orion.client.runner import Protected
from orion.core.io.database.pickleddb import PickledDB
from orion.core.worker.consumer import Consumer
from orion.core.worker.experiment import Experiment
from orion.core.worker.producer import Producer
from orion.core.worker.trial_pacemaker import TrialPacemaker
from orion.storage.legacy import Legacy

from .algorithm_lock import algorithm_lock, note_signal, pickled_copy
from .budget import done_within_budget, observe_patiently, produce_within_budget
from .database import PICKLEDDB_OPERATIONS, fenced_locked_database, patiently
from .heartbeat import (beat, push_results_of_this_reservation, run_trial, set_status_of_this_reservation,
                        update_heartbeat_of_this_reservation)
from .lost_trials import fix_lost_trials
from .records import consume_and_record


@dataclass(frozen=True)
class Patch:
    owner: object  # The Oríon class or module whose attribute is replaced.
    name: str
    replacement: object

    @property
    def target(self) -> str:
        """`module.Class.attribute`, as docs/orion-patches.md names it."""
        owner = self.owner
        prefix = owner.__name__ if isinstance(owner, types.ModuleType) else f"{owner.__module__}.{owner.__qualname__}"
        return f"{prefix}.{self.name}"


# Oríon's state copies, by a pickle round trip instead of copy.deepcopy (algorithm_lock.py).
FAST_COPY = types.SimpleNamespace(copy=copy.copy, deepcopy=pickled_copy)

# Every process that opens the database (each subcommand, hunt's workers included). Oríon's own
# operations, wrapped once, at import, so that installing twice wraps nothing twice.
DATABASE = [Patch(PickledDB, "locked_database", fenced_locked_database)] + [
    Patch(PickledDB, name, patiently(getattr(PickledDB, name))) for name in PICKLEDDB_OPERATIONS]

# The workers of `hunt`, besides.
WORKER = [
    Patch(Producer, "produce", produce_within_budget),
    Patch(Producer, "observe", observe_patiently),
    Patch(Experiment, "is_done", property(done_within_budget)),
    Patch(Legacy, "acquire_algorithm_lock", algorithm_lock),
    Patch(Experiment, "fix_lost_trials", fix_lost_trials),
    Patch(Legacy, "update_heartbeat", update_heartbeat_of_this_reservation),
    Patch(Legacy, "set_trial_status", set_status_of_this_reservation),
    Patch(Legacy, "push_trial_results", push_results_of_this_reservation),
    Patch(orion.algo.base.registry, "copy", FAST_COPY),
    Patch(orion.core.worker.algo_wrappers.algo_wrapper, "copy", FAST_COPY),
    Patch(orion.core.worker.algo_wrappers.insist_suggest, "copy", FAST_COPY),
    Patch(TrialPacemaker, "run", beat),
    Patch(Consumer, "execute_process", run_trial),
    Patch(Consumer, "__call__", consume_and_record),
    Patch(Protected, "handler", note_signal),
]


def install(patches: list[Patch]) -> None:
    for patch in patches:
        setattr(patch.owner, patch.name, patch.replacement)


def install_database_lock() -> None:
    """Every PickledDB of this process locks and writes as database.py describes."""
    install(DATABASE)


def install_fast_algorithm_copies() -> None:
    """Oríon's algorithm registry and wrappers copy their state with `pickled_copy`."""
    install([patch for patch in WORKER if patch.replacement is FAST_COPY])
