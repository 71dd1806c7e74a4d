"""benchmarks/search_simulation.py: its quick mode runs, and what it claims about Oríon holds.

The simulation drives Oríon's real algorithms (no training), so these tests need Oríon but no
data and no GPU. The quick run is one subprocess shared by the tests that read its output; the
others import the module and simulate single settings in-process.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, import_benchmark
SCRIPT = REPO_ROOT / "benchmarks" / "search_simulation.py"

pytest.importorskip("orion.algo.tpe")

TABLES = [
    "Objective: noise-free validation error",
    "Rankings: error after e epochs",
    "Budget and concurrency: trials handed out",
    "Best validation error against trials completed",
    "Best validation error against epochs spent",
    "ASHA: --epochs~'fidelity(low, high, base)'",
]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("search-simulation") / "quick.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=600,
    )
    elapsed = time.perf_counter() - started
    assert run.returncode == 0, run.stdout + run.stderr
    print(f"search_simulation.py --quick took {elapsed:.1f} s")
    return run.stdout, json.loads(out.read_text())


@pytest.fixture(scope="module")
def sim():
    module = import_benchmark(SCRIPT)
    module.quiet_orion()
    return module


def test_quick_mode_runs_and_prints_its_tables(quick):
    output, results = quick
    lines = output.splitlines()
    assert lines[0].startswith("== Search simulation"), output[:500]
    for title in TABLES:
        assert any(line.startswith(title) for line in lines), f"table {title!r} missing:\n{output}"
    # Every setting has a row, and the JSON holds a summary and one run per seed for each.
    assert results["quick"] is True and len(results["seeds"]) >= 2
    for setting in results["settings"]:
        assert any(line.startswith(setting["name"]) for line in lines), setting["name"]
        assert len(setting["runs"]) == len(results["seeds"])
        assert setting["summary"]["best_final_mean"] < 0.9
    assert {s["algorithm"] for s in results["settings"]} == {"random", "tpe", "asha"}


def test_capped_settings_never_hand_out_more_than_the_budget(quick):
    _, results = quick
    capped = [s for s in results["settings"] if s["cap"]]
    assert capped
    for setting in capped:
        for run in setting["runs"]:
            assert run["handed_out"] <= setting["budget"], (setting["name"], run["handed_out"])
            assert run["completed"] == run["handed_out"] and not run["stalled"], setting["name"]
            if setting["algorithm"] != "asha":  # random and TPE: exactly the budget
                assert run["handed_out"] == setting["budget"], setting["name"]


def test_orion_default_overshoots_by_up_to_workers_minus_one(quick):
    _, results = quick
    default = [s for s in results["settings"] if not s["cap"]]
    assert default
    for setting in default:
        for run in setting["runs"]:
            assert setting["budget"] < run["handed_out"] <= setting["budget"] + setting["workers"] - 1, setting["name"]
    upstream = next(s for s in default if s["name"].startswith("upstream"))
    # 50 workers, budget 10: every worker starts one, then each of the first 9 to finish starts another.
    assert [run["handed_out"] for run in upstream["runs"]] == [59] * len(upstream["runs"])


def _spy_on_algorithm(sim, monkeypatch):
    """Records the real algorithm's suggest/observe calls, in order: [('suggest', n), ('observe', n)]."""
    calls = []
    build = sim.build_algorithm

    def spying_build(setting, seed):
        algorithm = build(setting, seed)
        suggest, observe = algorithm.suggest, algorithm.observe

        def spy_suggest(num):
            trials = suggest(num)
            calls.append(("suggest", len(trials)))
            return trials

        def spy_observe(trials):
            calls.append(("observe", len(trials)))
            return observe(trials)

        algorithm.suggest, algorithm.observe = spy_suggest, spy_observe
        return algorithm

    monkeypatch.setattr(sim, "build_algorithm", spying_build)
    return calls


@pytest.mark.parametrize("workers", [10, 50])
def test_tpe_suggests_every_trial_before_observing_any_when_workers_cover_the_budget(sim, monkeypatch, workers):
    calls = _spy_on_algorithm(sim, monkeypatch)
    setting = sim.Setting("t", "test", "tpe", workers, 10, True, n_initial_points=5)
    run = sim.simulate(setting, 1, sim.Landscape())
    first_observe = next(i for i, (kind, _) in enumerate(calls) if kind == "observe")
    suggested_before = sum(n for kind, n in calls[:first_observe] if kind == "suggest")
    assert suggested_before == 10 == run.handed_out == run.suggested_before_first_result
    assert not any(kind == "suggest" and n for kind, n in calls[first_observe:])  # nothing after
    assert run.model_guided == 0  # TPE never left its random phase


def test_tpe_uses_its_model_when_the_budget_exceeds_the_workers(sim, monkeypatch):
    setting = sim.Setting("t", "test", "tpe", 2, 8, True, n_initial_points=2)
    run = sim.simulate(setting, 1, sim.Landscape())
    assert run.handed_out == 8 and run.suggested_before_first_result == 2
    assert run.model_guided >= 5  # once 2 trials completed, every later suggestion is TPE's


def test_asha_resumes_promotions_and_respects_the_budget(sim):
    setting = sim.Setting("a", "test", "asha", 4, 30, True, fidelity=(1, 10, 3))
    run = sim.simulate(setting, 2, sim.Landscape())
    assert run.handed_out == 30 and not run.stalled
    fidelities = {c.fidelity for c in run.trials}
    assert fidelities <= {1, 3, 10} and {1, 3} <= fidelities
    # A promoted trial trains only the missing epochs: fewer epochs than retraining each from scratch.
    assert run.epochs_spent == sum(c.epochs_trained for c in run.trials) < run.epochs_without_reuse
    assert all(c.epochs_trained in (1, 2, 7) for c in run.trials)


def test_objective_is_deterministic_and_shaped_like_the_training(sim):
    landscape = sim.Landscape()
    # Same seed, configuration and epochs -> same value (a promotion equals training straight there).
    assert landscape.error(1e-3, 1e-4, 3, 7) == landscape.error(1e-3, 1e-4, 3, 7)
    assert landscape.error(1e-3, 1e-4, 3, 7) != landscape.error(1e-3, 1e-4, 3, 8)
    # More epochs -> lower error; best near lr 1e-3; divergence above ~0.1.
    curve = [landscape.clean_error(1e-3, 1e-4, e) for e in range(1, 11)]
    assert curve == sorted(curve, reverse=True)
    assert landscape.clean_error(1e-3, 1e-4, 10) < min(landscape.clean_error(lr, 1e-4, 10) for lr in (1e-5, 1e-4, 1e-2))
    assert landscape.clean_error(0.3, 1e-4, 10) > 0.89
    assert abs(landscape.clean_error(1.4e-3, 1e-4, 10) - (1 - sim.UPSTREAM_MEASURED[1.4e-3])) < 0.02


def test_asha_bracket_cost_matches_orion(sim):
    from orion.algo.asha import compute_budgets

    for fidelity, brackets in [((1, 10, 3), 1), ((1, 10, 2), 1), ((2, 10, 2), 2), ((3, 10, 3), 1)]:
        low, high, base = fidelity
        cost = sim.asha_bracket_cost(fidelity, brackets)
        num_rungs = len(cost["rungs"])
        orion = compute_budgets(low, high, base, num_rungs, brackets)
        assert [[(int(b.n_trials), int(b.resource_budget)) for b in bracket] for bracket in orion] == [
            list(zip(ns, rungs)) for rungs, ns in cost["brackets"]
        ]
