"""Search simulation: the real Oríon 0.2.7 algorithms, W concurrent workers, a cheap synthetic objective.

Chooses the search defaults (budget per worker count, TPE's `n_initial_points`, ASHA's rungs)
from figures instead of guesses, on the CPU, in minutes. Nothing is trained: the objective is a
formula shaped like this example's training (ResNet18, CIFAR-10, AdamW, 10 epochs), but every
suggestion comes from Oríon's own algorithm code (`orion.algo.random.Random`,
`orion.algo.tpe.TPE`, `orion.algo.asha.ASHA`), wrapped as `orion hunt` wraps it
(`orion.core.worker.primary_algo.create_algo`: space transforms + insisting suggest), with
`max_trials` set on it as the experiment builder does.

What the simulation reproduces of Oríon 0.2.7's worker/producer (read from its source):
- a worker asks for a trial only when its previous one has finished (`orion hunt`'s
  default pool size is 1); `algorithm.suggest(1)` is called under the algorithm lock;
- the algorithm observes a trial only when it completes (`Producer.observe` on release), so
  TPE leaves its random phase once `n_initial_points` trials have *completed*;
- a worker stops when `experiment.is_done`: `completed >= max_trials or (algorithm.is_done and
  no pending trial)`. This is Oríon's default, which hands out up to `max_trials + W - 1`
  trials. The "capped" mode adds what the project enforces: no more than `budget` trials are
  ever handed out (a worker that would get trial number budget + 1 exits instead);
- a worker whose `suggest` returns nothing (ASHA waiting for a rung to complete) waits and
  retries (here: at the next completion), as on `WaitingForTrials`;
- trials run to completion once handed out (nothing is killed when the budget is reached).

Time: a trial takes (epochs it trains) x (1 +- 5 % jitter) time units, one unit being one
epoch on one worker; workers start within 0.02 units of each other. For ASHA (`--epochs` as
`fidelity(low, high, base)`), a promoted trial resumes from its lower rung's checkpoint and
trains only the missing epochs (what main.py does with the working directory Oríon copies
from the parent trial); "epochs without reuse" counts what retraining from scratch would cost.

Objective (validation error = 1 - accuracy) of a configuration after e epochs:
    err(e) = A(lr, wd) + (0.9 - A(lr, wd)) * exp(-e / tau(lr)) + noise
- A: the asymptote, best (0.275) at lr = 1e-3, quadratic in log10(lr) (steeper above the
  optimum), a mild weight-decay term (at most ~0.04, optimum near 1e-2, shifting with lr), and
  divergence above lr ~ 0.1 (error 0.9, chance level);
- tau: how fast a configuration learns, 1 epoch at lr = 1e-3, proportional to lr^-0.35: a
  larger learning rate learns faster early on and plateaus higher, so at 1 epoch lr = 3e-3
  looks better than the optimum, from about 3 epochs on it no longer does (table "Rankings":
  among learning rates 1e-4..1e-2, Spearman ~0.2 at 1 epoch, ~0.6 at 2, ~0.8 at 3, ~0.97 at 5);
- noise: seeded, a function of (seed, configuration, epoch) only, so a promoted trial gets
  exactly what training straight to its fidelity would give: 0.008 per configuration (the
  training seed), plus 0.005 per evaluation (5,000 validation images), plus
  0.015 x exp(-(e - 1)) early in training.
Calibrated loosely on upstream's logged accuracies (table "Objective" prints both: 10 epochs,
lr 7.2e-5 / 2.1e-4 / 1.4e-3 -> error 0.453 / 0.342 / 0.283 here, 0.453 / 0.364 / 0.284 logged)
and on ~50 % accuracy after one epoch at lr = 1e-3. It is an assumption, not a measurement: the rung choice in particular rests on
how fast rankings settle, which the real training must confirm.

    uv run python benchmarks/search_simulation.py [--quick] [--seeds N] [--json PATH]

`--quick`: 2 seeds, small budgets (seconds). Full mode: 10 seeds, every setting (minutes on 2
cores). `--only TEXT` runs the settings whose name contains TEXT.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import heapq
import itertools
import json
import logging
import math
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

import common

# --------------------------------------------------------------------------------------
# The synthetic objective
# --------------------------------------------------------------------------------------

HIGH_EPOCHS = 10  # main.py's --epochs default, the full fidelity
DEFAULT_WEIGHT_DECAY = 1e-4  # main.py's --weight-decay default (used when it is not searched)
LR_PRIOR = "loguniform(1e-5, 1.0)"
WD_PRIOR = "loguniform(1e-6, 1e-1)"

# Upstream's logs (10 epochs, AdamW, batch 128, no augmentation): lr -> validation accuracy.
UPSTREAM_MEASURED = {2.1e-4: 0.636, 7.2e-5: 0.547, 1.4e-3: 0.716}


@dataclass(frozen=True)
class Landscape:
    best_error: float = 0.275  # asymptotic validation error at the best learning rate
    lr_opt_log10: float = -3.0  # AdamW's best learning rate, 1e-3
    curvature_low: float = 0.12  # error added per (decade below the optimum)^2
    curvature_high: float = 0.22  # per (decade above)^2
    wd_opt_log10: float = -2.0  # best weight decay at lr = 1e-3 ...
    wd_lr_shift: float = 0.5  # ... moving down by 0.5 decade per decade of lr above 1e-3
    wd_effect: float = 0.03  # error added 4 decades away from the best weight decay
    diverge_log10: float = -1.0  # lr = 0.1: half the runs diverge
    diverge_width: float = 0.08  # in decades
    chance_error: float = 0.9  # 10 classes
    tau_at_opt: float = 1.0  # epochs, time constant of the learning curve at lr = 1e-3
    tau_exponent: float = 0.35  # tau proportional to lr^-0.35
    config_noise: float = 0.008  # per configuration (a training seed's luck), all epochs
    eval_noise: float = 0.005  # per evaluation
    early_noise: float = 0.015  # extra per evaluation at 1 epoch, decaying by e per epoch
    early_noise_decay: float = 1.0  # epochs

    def asymptote(self, lr: float, wd: float) -> float:
        x = math.log10(lr) - self.lr_opt_log10
        a = self.best_error + (self.curvature_low if x < 0 else self.curvature_high) * x * x
        y = (math.log10(wd) - self.wd_opt_log10 + self.wd_lr_shift * x) / 4.0
        a += self.wd_effect * min(y * y, 1.5)
        a = min(a, self.chance_error)
        z = (math.log10(lr) - self.diverge_log10) / self.diverge_width
        diverged = 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))
        return a * (1.0 - diverged) + self.chance_error * diverged

    def tau(self, lr: float) -> float:
        return self.tau_at_opt * (10.0 ** self.lr_opt_log10 / lr) ** self.tau_exponent

    def clean_error(self, lr: float, wd: float, epochs: float) -> float:
        a = self.asymptote(lr, wd)
        return a + (self.chance_error - a) * math.exp(-epochs / self.tau(lr))

    def error(self, lr: float, wd: float, epochs: int, seed: int) -> float:
        """The validation error a trial reports: deterministic in (seed, configuration, epochs)."""
        key = (seed, f"{lr:.12g}", f"{wd:.12g}")
        noise = self.config_noise * _gauss(*key) + (
            self.eval_noise + self.early_noise * math.exp(-(epochs - 1) / self.early_noise_decay)
        ) * _gauss(*key, epochs)
        return min(max(self.clean_error(lr, wd, epochs) + noise, 0.0), 0.95)

    def best_clean_error(self) -> float:
        """The noise-free optimum at full fidelity, over a fine grid (the regret's reference)."""
        return min(
            self.clean_error(10 ** (-5 + 5 * i / 400), 10 ** (-6 + 5 * j / 100), HIGH_EPOCHS)
            for i in range(401) for j in range(101)
        )


def _gauss(*key) -> float:
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little")).gauss(0.0, 1.0)


def spearman(a: list, b: list) -> float | None:
    if len(a) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        r = [0.0] * len(values)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else None


def top_overlap(low: list, full: list, k: int) -> float | None:
    """Of the k best by `low`, the fraction that are among the k best by `full`."""
    if k < 1 or len(low) < k:
        return None
    best_low = set(sorted(range(len(low)), key=low.__getitem__)[:k])
    best_full = set(sorted(range(len(full)), key=full.__getitem__)[:k])
    return len(best_low & best_full) / k


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------


@dataclass
class Setting:
    name: str
    group: str
    algorithm: str  # random | tpe | asha
    workers: int
    budget: int  # max_trials
    cap: bool  # True: never more than `budget` trials handed out (the project); False: Oríon's default
    search_wd: bool = True  # learning rate and weight decay, or learning rate only (upstream)
    n_initial_points: int | None = None  # TPE
    fidelity: tuple | None = None  # ASHA: (low, high, base) of --epochs
    num_brackets: int = 1  # ASHA
    asha_fresh_seed_per_repetition: bool = True  # see `simulate`


def asha_bracket_cost(fidelity: tuple, num_brackets: int = 1) -> dict:
    """Rungs, trials and epochs of one repetition of ASHA's brackets (Oríon's compute_budgets), no Oríon import."""
    low, high, base = fidelity
    num_rungs = int(math.log(high / low) / math.log(base) + 1)
    budgets = [int(b + 0.5) for b in _logspace(math.log(low, base), math.log(high, base), num_rungs, base)]
    for i in range(num_rungs - 1):
        if budgets[i] >= budgets[i + 1]:
            budgets[i + 1] = budgets[i] + 1
    brackets = []
    for first in range(min(num_brackets, num_rungs)):
        rungs = budgets[first:]
        n_trials = [base ** (len(rungs) - 1 - i) for i in range(len(rungs))]
        brackets.append((rungs, n_trials))
    trials = sum(sum(n) for _, n in brackets)
    resume = sum(n * (r - (rungs[i - 1] if i else 0)) for rungs, ns in brackets for i, (n, r) in enumerate(zip(ns, rungs)))
    retrain = sum(n * r for rungs, ns in brackets for n, r in zip(ns, rungs))
    return dict(rungs=brackets[0][0], n_trials=brackets[0][1], brackets=brackets, trials=trials,
                epochs_resume=resume, epochs_retrain=retrain)


def _logspace(start, stop, num, base):
    if num == 1:
        return [base ** start]
    return [base ** (start + (stop - start) * i / (num - 1)) for i in range(num)]


def asha_budget_for_epochs(fidelity: tuple, epochs: float, num_brackets: int = 1) -> int:
    """max_trials for ASHA that spends about `epochs` epochs (resuming promotions)."""
    cost = asha_bracket_cost(fidelity, num_brackets)
    return max(cost["trials"], round(epochs * cost["trials"] / cost["epochs_resume"]))


# (fidelity (low, high, base), num_brackets)
ASHA_VARIANTS_FULL = [((1, 10, 3), 1), ((1, 10, 2), 1), ((2, 10, 2), 1), ((3, 10, 3), 1), ((2, 10, 2), 2)]
ASHA_VARIANTS_QUICK = [((1, 10, 3), 1), ((2, 10, 2), 1)]


def settings_for(quick: bool) -> list:
    s = []
    # Upstream: job.sh's TPE (n_initial_points 5), max_trials 10, learning rate only, and its
    # README's 5-per-GPU launch: 10 array tasks x 5 tasks = 50 workers.
    for cap in (False, True):
        s.append(Setting(
            f"upstream TPE n0=5 W=50 B=10 lr {'capped' if cap else 'Orion default'}", "upstream",
            "tpe", 50, 10, cap, search_wd=False, n_initial_points=5,
        ))
    if quick:
        n_inits, workers = (5, 10), 10
        s.append(Setting(f"random W={workers} B=30", "budget", "random", workers, 30, True))
        for n0 in n_inits:
            s.append(Setting(f"TPE n0={n0} W={workers} B=30", "budget", "tpe", workers, 30, True, n_initial_points=n0))
        s.append(Setting("TPE n0=10 W=10 B=30 Orion default", "default", "tpe", workers, 30, False, n_initial_points=10))
        epochs_budget = 200
        variants = ASHA_VARIANTS_QUICK
    else:
        workers = 10
        for budget in (30, 50, 100):
            s.append(Setting(f"random W=10 B={budget}", "budget", "random", workers, budget, True))
            for n0 in (5, 10, 20):
                s.append(Setting(f"TPE n0={n0} W=10 B={budget}", "budget", "tpe", workers, budget, True, n_initial_points=n0))
        for budget in (30, 50, 100):
            s.append(Setting(f"TPE n0=10 W=10 B={budget} Orion default", "default", "tpe", workers, budget, False, n_initial_points=10))
        # Other worker counts: budget = 3, 5, 10 x W with n_initial_points = W (W=20: 3 and 5 x W;
        # TPE's cost per suggestion grows with the trials observed, 200 would double the run time).
        for w, ks in ((5, (3, 5, 10)), (20, (3, 5))):
            for k in ks:
                s.append(Setting(f"TPE n0={w} W={w} B={k * w}", "workers", "tpe", w, k * w, True, n_initial_points=w))
            s.append(Setting(f"random W={w} B={5 * w}", "workers", "random", w, 5 * w, True))
        epochs_budget = 500
        variants = ASHA_VARIANTS_FULL
    for fid, brackets in variants:
        budget = asha_budget_for_epochs(fid, epochs_budget, brackets)
        s.append(Setting(
            f"ASHA fidelity({fid[0]},{fid[1]},base={fid[2]})" + (f" brackets={brackets}" if brackets > 1 else "")
            + f" W={workers} B={budget}", "asha", "asha", workers, budget, True, fidelity=fid, num_brackets=brackets,
        ))
    return s


# --------------------------------------------------------------------------------------
# Driving the real algorithms
# --------------------------------------------------------------------------------------


def quiet_orion():
    warnings.filterwarnings("ignore", message=".*pkg_resources.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("orion").setLevel(logging.ERROR)


def build_algorithm(setting: Setting, seed: int):
    """The algorithm as `orion hunt` builds it: create_algo(...) wrappers, max_trials set."""
    from orion.core.io.space_builder import SpaceBuilder
    from orion.core.worker.primary_algo import create_algo

    priors = {"learning_rate": LR_PRIOR}
    if setting.search_wd:
        priors["weight_decay"] = WD_PRIOR
    if setting.algorithm == "asha":
        low, high, base = setting.fidelity
        priors["epochs"] = f"fidelity({low}, {high}, base={base})"
    space = SpaceBuilder().build(priors)
    if setting.algorithm == "random":
        from orion.algo.random import Random
        algorithm = create_algo(Random, space, seed=seed)
    elif setting.algorithm == "tpe":
        from orion.algo.tpe import TPE
        algorithm = create_algo(TPE, space, seed=seed, n_initial_points=setting.n_initial_points)
    elif setting.algorithm == "asha":
        from orion.algo.asha import ASHA
        algorithm = create_algo(ASHA, space, seed=seed, num_brackets=setting.num_brackets)
    else:
        raise ValueError(setting.algorithm)
    algorithm.max_trials = setting.budget  # what experiment_builder does with max_trials
    if setting.algorithm == "asha" and setting.asha_fresh_seed_per_repetition:
        # InsistSuggest asks the algorithm up to 100 times before returning nothing. Asking again
        # helps an algorithm whose suggestions can be duplicates (random, TPE: kept at 100) or
        # Hyperband/ASHA whose bracket ran out of samples (it refills on the next call, which
        # with a fresh seed per repetition does not happen within a budget). For ASHA waiting on
        # a rung all 100 come back empty, each with an O(trials) `is_done` check: at ~10-50 ms
        # per ask, for every completion, that is most of the simulation's time. One ask gives the
        # same trials.
        algorithm.max_suggest_attempts = 1
    return algorithm


@dataclass
class Completed:
    time: float
    objective: float
    fidelity: int
    epochs_trained: int
    lr: float
    wd: float
    clean: float  # noise-free full-fidelity error of this configuration


@dataclass
class RunResult:
    seed: int
    handed_out: int
    completed: int
    epochs_spent: int
    epochs_without_reuse: int
    suggested_before_first_result: int
    model_guided: int  # TPE: suggestions made with >= n_initial_points completed trials observed
    makespan: float  # time units (epochs of one worker) until the last trial finished
    idle_fraction: float  # worker time spent waiting for a suggestion / (W x makespan)
    longest_wait: float
    stalled: bool  # the algorithm stopped suggesting before the experiment was done
    best_final: float
    true_error_of_pick: float  # noise-free full-fidelity error of the best-reported configuration
    full_fidelity_completed: int
    rung0_spearman: float | None = None
    rung0_top_overlap: float | None = None
    trials: list = field(default_factory=list)  # [Completed] in completion order


def simulate(setting: Setting, seed: int, landscape: Landscape) -> RunResult:
    algorithm = build_algorithm(setting, seed)
    inner = algorithm.unwrapped
    is_tpe, is_asha = setting.algorithm == "tpe", setting.algorithm == "asha"
    low_fidelity = setting.fidelity[0] if is_asha else HIGH_EPOCHS
    schedule = random.Random(f"schedule-{seed}")
    from orion.core.worker.trial import Trial

    events, order = [], itertools.count()
    for worker in range(setting.workers):
        heapq.heappush(events, (schedule.uniform(0.0, 0.02), next(order), worker, None))
    waiting = {}  # worker -> since when
    pending = handed_out = model_guided = 0
    before_first = None
    completed = []
    checkpoint = {}  # configuration -> epochs trained so far (main.py's checkpoint)
    epochs_without_reuse = 0
    waited = longest_wait = 0.0
    now = 0.0

    def config_of(trial):
        params = trial.params
        return params["learning_rate"], params.get("weight_decay", DEFAULT_WEIGHT_DECAY)

    def experiment_is_done():
        return len(completed) >= setting.budget or (pending == 0 and algorithm.is_done)

    def ask(worker) -> str:
        nonlocal pending, handed_out, model_guided, epochs_without_reuse
        if setting.cap and handed_out >= setting.budget:
            return "exit"
        if experiment_is_done():
            return "exit"
        if is_asha and setting.asha_fresh_seed_per_repetition:
            # Oríon's ASHA re-seeds every new repetition of its brackets with its own seed
            # (Hyperband.seed_brackets), so with a fixed seed each repetition draws from the same
            # sample buffer and the search stops after ~10 repetitions (see the table "ASHA with a
            # fixed seed"). With `seed: null` every repetition gets fresh seeds; this gives that
            # behaviour, reproducibly: a seed per repetition, derived from ours.
            inner.seed = (seed, len(inner.brackets))
        guided = is_tpe and inner.n_observed >= setting.n_initial_points
        trials = algorithm.suggest(1)
        if not trials:
            return "wait"
        trial = trials[0]
        handed_out += 1
        pending += 1
        model_guided += guided
        fidelity = int(trial.params["epochs"]) if is_asha else HIGH_EPOCHS
        config = config_of(trial)
        have = checkpoint.get(config, 0)
        to_train = fidelity - have if have <= fidelity else fidelity
        epochs_without_reuse += fidelity
        duration = max(to_train, 0) * (1.0 + 0.05 * schedule.gauss(0.0, 1.0))
        heapq.heappush(events, (now + max(duration, 1e-3), next(order), worker, (trial, fidelity, to_train)))
        return "run"

    def offer(worker):
        nonlocal waited, longest_wait
        outcome = ask(worker)
        if outcome == "wait":
            waiting.setdefault(worker, now)
        elif worker in waiting:
            wait = now - waiting.pop(worker)
            waited += wait
            longest_wait = max(longest_wait, wait)
        return outcome

    while events:
        now, _, worker, payload = heapq.heappop(events)
        if payload is not None:
            trial, fidelity, to_train = payload
            pending -= 1
            if before_first is None:
                before_first = handed_out
            lr, wd = config_of(trial)
            objective = landscape.error(lr, wd, fidelity, seed)
            done = copy.deepcopy(trial)
            done.status = "completed"
            done.results = [Trial.Result(name="objective", type="objective", value=objective)]
            algorithm.observe([done])  # Producer.observe, on release of a completed trial
            checkpoint[(lr, wd)] = max(checkpoint.get((lr, wd), 0), fidelity)
            completed.append(Completed(now, objective, fidelity, to_train, lr, wd, landscape.clean_error(lr, wd, HIGH_EPOCHS)))
        # The finishing worker asks first, then those waiting, in order, until one is told to wait
        # (nothing has changed for the others since then).
        for candidate in [worker] + [w for w in waiting if w != worker]:
            if offer(candidate) == "wait":
                break
    # Workers still waiting when nothing runs any more and the experiment is not done: the
    # algorithm stopped suggesting (Oríon's workers would wait, then die of LazyWorkers).
    stalled = bool(waiting)
    for since in waiting.values():
        waited += now - since
        longest_wait = max(longest_wait, now - since)

    best = min(completed, key=lambda c: c.objective)
    result = RunResult(
        seed=seed, handed_out=handed_out, completed=len(completed),
        epochs_spent=sum(c.epochs_trained for c in completed), epochs_without_reuse=epochs_without_reuse,
        suggested_before_first_result=before_first or 0, model_guided=model_guided,
        makespan=now, idle_fraction=waited / (setting.workers * now) if now else 0.0, longest_wait=longest_wait,
        stalled=stalled, best_final=best.objective,
        true_error_of_pick=landscape.clean_error(best.lr, best.wd, HIGH_EPOCHS),
        full_fidelity_completed=sum(c.fidelity >= HIGH_EPOCHS for c in completed), trials=completed,
    )
    if is_asha:
        rung0 = [c for c in completed if c.fidelity == low_fidelity]
        low = [c.objective for c in rung0]
        full = [landscape.error(c.lr, c.wd, HIGH_EPOCHS, seed) for c in rung0]
        result.rung0_spearman = spearman(low, full)
        result.rung0_top_overlap = top_overlap(low, full, len(rung0) // setting.fidelity[2])
    return result


def best_after_trials(run: RunResult, k: int) -> Completed | None:
    """The best-reported of the first k completed trials."""
    return min(run.trials[:k], key=lambda c: c.objective, default=None)


def best_within_epochs(run: RunResult, epochs: float) -> Completed | None:
    """The best-reported of the trials completed with at most `epochs` epochs spent."""
    best, spent = None, 0
    for c in run.trials:
        spent += c.epochs_trained
        if spent > epochs:
            break
        if best is None or c.objective < best.objective:
            best = c
    return best


def asha_fixed_seed_stall(fidelity: tuple, seed: int, limit: int) -> dict:
    """One worker, ASHA with a fixed seed (as in a config file with `seed: 1`): trials until it stops suggesting."""
    setting = Setting("stall", "quirk", "asha", 1, limit, True, fidelity=fidelity, asha_fresh_seed_per_repetition=False)
    run = simulate(setting, seed, Landscape())
    cost = asha_bracket_cost(fidelity)
    return dict(
        fidelity=list(fidelity), rungs=cost["rungs"], trials_per_bracket=cost["trials"],
        trials_before_stall=run.handed_out if run.stalled else None, stalled=run.stalled, limit=limit,
        epochs_before_stall=run.epochs_spent,
    )


# --------------------------------------------------------------------------------------
# Summaries and tables
# --------------------------------------------------------------------------------------


def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def mm(values, digits=3) -> str:
    """'mean / median' of the values (those that exist)."""
    m, d = mean(values), med(values)
    if m is None:
        return "-"
    return f"{m:.{digits}f} / {d:.{digits}f}"


def summarize(setting: Setting, runs: list, epoch_marks: list) -> dict:
    fractions = (0.25, 0.5, 1.0)
    summary = dict(
        handed_out_mean=mean([r.handed_out for r in runs]), handed_out_max=max(r.handed_out for r in runs),
        epochs_spent_mean=mean([r.epochs_spent for r in runs]),
        epochs_without_reuse_mean=mean([r.epochs_without_reuse for r in runs]),
        suggested_before_first_result_mean=mean([r.suggested_before_first_result for r in runs]),
        model_guided_mean=mean([r.model_guided for r in runs]),
        makespan_mean=mean([r.makespan for r in runs]),
        idle_fraction_mean=mean([r.idle_fraction for r in runs]),
        longest_wait_max=max(r.longest_wait for r in runs),
        stalled_runs=sum(r.stalled for r in runs),
        best_final_mean=mean([r.best_final for r in runs]), best_final_median=med([r.best_final for r in runs]),
        true_error_of_pick_mean=mean([r.true_error_of_pick for r in runs]),
        true_error_of_pick_se=(statistics.stdev([r.true_error_of_pick for r in runs]) / math.sqrt(len(runs))
                               if len(runs) > 1 else None),
        full_fidelity_completed_mean=mean([r.full_fidelity_completed for r in runs]),
        rung0_spearman_mean=mean([r.rung0_spearman for r in runs]),
        rung0_top_overlap_mean=mean([r.rung0_top_overlap for r in runs]),
        best_at_trials={}, best_within_epochs={},
    )
    def entry(picks):
        objectives = [p.objective if p else None for p in picks]
        return dict(mean=mean(objectives), median=med(objectives), true_mean=mean([p.clean if p else None for p in picks]),
                    runs=sum(p is not None for p in picks))

    for f in fractions:
        k = max(1, math.ceil(f * setting.budget))
        summary["best_at_trials"][f"{int(f * 100)}%"] = dict(
            trials=k, **entry([best_after_trials(r, k) if r.completed >= k else None for r in runs]),
        )
    for e in epoch_marks:
        summary["best_within_epochs"][str(e)] = entry([best_within_epochs(r, e) for r in runs])
    return summary


def fmt_pair(entry) -> str:
    """'best reported: mean / median [noise-free error of that pick: mean]'."""
    if entry["mean"] is None:
        return "-"
    return f"{entry['mean']:.3f} / {entry['median']:.3f} [{entry['true_mean']:.3f}]"


def rank_preservation(landscape: Landscape, seeds: list, n_configs: int) -> list:
    """How well the error after e epochs ranks configurations by their full-fidelity error."""
    rows = []
    for e in (1, 2, 3, 5):
        stats = {"all": ([], []), "plausible": ([], []), "pick_regret": []}
        for seed in seeds:
            draw = random.Random(f"configs-{seed}")
            configs = [(10 ** draw.uniform(-5, 0), 10 ** draw.uniform(-6, -1)) for _ in range(n_configs)]
            plausible = [c for c in configs if 1e-4 <= c[0] <= 1e-2]
            for name, subset in (("all", configs), ("plausible", plausible)):
                low = [landscape.error(lr, wd, e, seed) for lr, wd in subset]
                full = [landscape.error(lr, wd, HIGH_EPOCHS, seed) for lr, wd in subset]
                stats[name][0].append(spearman(low, full))
                stats[name][1].append(top_overlap(low, full, max(1, len(subset) // 10)))
            # Of 9 random configurations (an ASHA first rung), the one best after e epochs: how
            # much worse is it at full fidelity than the truly best of the 9?
            for start in range(0, len(plausible) - 8, 9):
                group = plausible[start:start + 9]
                low = [landscape.error(lr, wd, e, seed) for lr, wd in group]
                full = [landscape.error(lr, wd, HIGH_EPOCHS, seed) for lr, wd in group]
                stats["pick_regret"].append(full[min(range(9), key=low.__getitem__)] - min(full))
        rows.append(dict(
            epochs=e, spearman_all=mean(stats["all"][0]), top10_all=mean(stats["all"][1]),
            spearman_plausible=mean(stats["plausible"][0]), top10_plausible=mean(stats["plausible"][1]),
            pick_regret_of_9=mean(stats["pick_regret"]),
        ))
    return rows


def calibration_rows(landscape: Landscape) -> list:
    rows = []
    for lr in (1e-5, 7.2e-5, 2.1e-4, 1e-3, 1.4e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3):
        rows.append([f"{lr:.1e}"] + [f"{landscape.clean_error(lr, DEFAULT_WEIGHT_DECAY, e):.3f}" for e in (1, 2, 3, 5, 10)]
                    + [f"{1 - UPSTREAM_MEASURED[lr]:.3f}" if lr in UPSTREAM_MEASURED else ""])
    return rows


def print_tables(settings, summaries, rank_rows, stall_rows, landscape, epoch_marks, optimum):
    common.print_table(
        "Objective: noise-free validation error (1 - accuracy) after e epochs, weight decay 1e-4",
        ["learning rate", "1 ep", "2 ep", "3 ep", "5 ep", "10 ep", "upstream measured, 10 ep"],
        calibration_rows(landscape),
        notes=[f"best noise-free error at 10 epochs over the whole space: {optimum:.3f} (the reference for regret)"],
    )
    common.print_table(
        "Rankings: error after e epochs against full-fidelity (10-epoch) error of the same configurations",
        ["epochs", "Spearman, all", "top-10% kept, all", "Spearman, lr 1e-4..1e-2", "top-10% kept, lr 1e-4..1e-2",
         "regret of best-of-9 pick"],
        [[r["epochs"], f"{r['spearman_all']:.3f}", f"{r['top10_all']:.2f}", f"{r['spearman_plausible']:.3f}",
          f"{r['top10_plausible']:.2f}", f"{r['pick_regret_of_9']:.4f}"] for r in rank_rows],
        notes=["configurations drawn from the priors; 'regret of best-of-9 pick': full-fidelity error of the "
               "configuration that looks best after e epochs among 9, minus the best of the 9 (an ASHA first rung)"],
    )
    plain = [(s, summaries[s.name]) for s in settings if s.algorithm != "asha"]
    common.print_table(
        "Budget and concurrency: trials handed out, epochs spent, what TPE's model guided",
        ["setting", "W", "budget", "handed out (mean/max)", "epochs", "before 1st result", "model-guided",
         "wall (epoch units)", "best: mean / median", "true err of pick"],
        [[s.name, s.workers, s.budget, f"{m['handed_out_mean']:.1f} / {m['handed_out_max']}", f"{m['epochs_spent_mean']:.0f}",
          f"{m['suggested_before_first_result_mean']:.1f}",
          f"{m['model_guided_mean']:.1f}" if s.algorithm == "tpe" else "-",
          f"{m['makespan_mean']:.1f}", f"{m['best_final_mean']:.3f} / {m['best_final_median']:.3f}",
          f"{m['true_error_of_pick_mean']:.3f} ± {common.fmt(m['true_error_of_pick_se'], 3)}"] for s, m in plain],
        notes=["'handed out': trials started (Orion default: up to budget + W - 1); 'before 1st result': trials "
               "handed out when the first one completed; 'model-guided': TPE suggestions made with at least "
               "n_initial_points completed trials observed; 'best': the lowest validation error reported "
               "(all trials, overshoot included); 'true err of pick': noise-free 10-epoch error of that configuration "
               "(mean ± standard error over seeds); "
               "wall: time until the last trial ended, one unit = one epoch on one worker"],
    )
    common.print_table(
        "Best validation error against trials completed: reported mean / median [noise-free error of the pick, mean]",
        ["setting", "25% of budget", "50%", "100%"],
        [[s.name] + [f"{fmt_pair(v)}  ({v['trials']})" for v in m["best_at_trials"].values()] for s, m in plain],
        notes=["(n) = trials completed at that point, in completion order; the reported best is the lowest noisy "
               "objective (it can beat the noise-free optimum by luck); [..] is what retraining that configuration would give"],
    )
    common.print_table(
        "Best validation error against epochs spent: reported mean / median [noise-free error of the pick, mean]",
        ["setting"] + [f"<= {e} epochs" for e in epoch_marks],
        [[s.name] + [fmt_pair(v) for v in summaries[s.name]["best_within_epochs"].values()] for s in settings],
        notes=["epochs of completed trials, in completion order; ASHA counts only the epochs trained "
               "(promotions resume from the lower rung's checkpoint); '-': no trial completed within"],
    )
    asha = [(s, summaries[s.name]) for s in settings if s.algorithm == "asha"]
    if asha:
        common.print_table(
            "ASHA: --epochs~'fidelity(low, high, base)', promotions resume from the lower rung's checkpoint",
            ["setting", "rungs (epochs x trials)", "repetition: trials / epochs (no reuse)", "handed out", "epochs (no reuse)",
             "10-epoch trials", "best: mean / median", "true err of pick", "rung-0 Spearman", "rung-0 top-1/base kept",
             "wall", "idle", "longest wait", "stalled"],
            [[s.name, " + ".join(" ".join(f"{r}x{n}" for r, n in zip(rungs, ns)) for rungs, ns in c["brackets"]),
              f"{c['trials']} / {c['epochs_resume']} ({c['epochs_retrain']})",
              f"{m['handed_out_mean']:.1f}", f"{m['epochs_spent_mean']:.0f} ({m['epochs_without_reuse_mean']:.0f})",
              f"{m['full_fidelity_completed_mean']:.1f}", f"{m['best_final_mean']:.3f} / {m['best_final_median']:.3f}",
              f"{m['true_error_of_pick_mean']:.3f} ± {common.fmt(m['true_error_of_pick_se'], 3)}",
              common.fmt(m["rung0_spearman_mean"], 3),
              common.fmt(m["rung0_top_overlap_mean"], 2), f"{m['makespan_mean']:.1f}", f"{100 * m['idle_fraction_mean']:.0f}%",
              f"{m['longest_wait_max']:.1f}", m["stalled_runs"]]
             for s, m in asha for c in [asha_bracket_cost(s.fidelity, s.num_brackets)]],
            notes=["budget (max_trials) chosen so that ASHA spends about the epochs of the TPE/random runs it is "
                   "compared with; 'rung-0 Spearman': rank correlation between the first rung's error and the "
                   "10-epoch error of the same configurations (first bracket's lowest rung); 'wall': time until the "
                   "last trial ended (epoch units; TPE/random W=10 B=50: ~51); 'idle': worker time spent waiting for "
                   "ASHA to suggest (WaitingForTrials), 'longest wait' in epoch units (Orion's worker exits with "
                   "LazyWorkers after --idle-timeout, 60 s by default)"],
        )
    if stall_rows:
        common.print_table(
            "ASHA with a fixed seed (e.g. `seed: 1` in the config): trials before it stops suggesting (one worker)",
            ["fidelity", "rungs", "trials per bracket", "trials before it stops", "epochs by then"],
            [[f"fidelity({r['fidelity'][0]},{r['fidelity'][1]},base={r['fidelity'][2]})", " ".join(map(str, r["rungs"])),
              r["trials_per_bracket"], r["trials_before_stall"] if r["stalled"] else f"> {r['limit']}",
              r["epochs_before_stall"]] for r in stall_rows],
            notes=["Hyperband.seed_brackets re-seeds each new repetition of the brackets with the algorithm's seed, so "
                   "they draw from the same buffer of 10 x (first-rung size) samples; once it is used up ASHA suggests "
                   "nothing and the experiment never completes. `seed: null` does not have this problem."],
        )


# --------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds, small budgets: proves the simulation runs")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default 10; --quick: 2)")
    parser.add_argument("--only", default=None, help="run only the settings whose name contains this text")
    parser.add_argument("--json", default=None, help="also write the results (settings, summaries, every run) here")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    quiet_orion()
    started = time.perf_counter()

    common.print_header("Search simulation: real Oríon algorithms, W concurrent workers, synthetic objective")
    landscape = Landscape()
    n_seeds = args.seeds or (2 if args.quick else 10)
    seeds = list(range(1, n_seeds + 1))
    settings = settings_for(args.quick)
    if args.only:
        settings = [s for s in settings if args.only in s.name]
    epoch_marks = [50, 100, 200] if args.quick else [100, 250, 500, 1000]
    print(f"seeds: {seeds}; settings: {len(settings)}; objective: {asdict(landscape)}", flush=True)

    optimum = landscape.best_clean_error()
    rank_rows = rank_preservation(landscape, seeds, 300 if args.quick else 1000)

    summaries, all_runs, timings = {}, {}, {}
    for setting in settings:
        t0 = time.perf_counter()
        runs = [simulate(setting, seed, landscape) for seed in seeds]
        timings[setting.name] = time.perf_counter() - t0
        all_runs[setting.name] = runs
        summaries[setting.name] = summarize(setting, runs, epoch_marks)
        print(f"  {setting.name}: {timings[setting.name]:.1f} s", flush=True)

    stall_rows = []
    if not args.quick and not args.only:
        t0 = time.perf_counter()
        stall_rows = [asha_fixed_seed_stall(fid, seed=1, limit=600) for fid, brackets in ASHA_VARIANTS_FULL if brackets == 1]
        timings["asha fixed-seed stall"] = time.perf_counter() - t0

    print_tables(settings, summaries, rank_rows, stall_rows, landscape, epoch_marks, optimum)
    elapsed = time.perf_counter() - started
    print(f"\nsimulation took {elapsed:.0f} s", flush=True)

    if args.json:
        payload = dict(
            command=" ".join([os.path.basename(sys.executable), *sys.argv]), quick=args.quick, seeds=seeds,
            elapsed_seconds=elapsed, landscape=asdict(landscape), best_clean_error=optimum,
            epoch_marks=epoch_marks, rank_preservation=rank_rows, asha_fixed_seed=stall_rows, timings=timings,
            settings=[dict(asdict(s), summary=summaries[s.name],
                           asha_bracket=asha_bracket_cost(s.fidelity, s.num_brackets) if s.fidelity else None,
                           runs=[dict({k: v for k, v in asdict(r).items() if k != "trials"},
                                      trials=[[round(c.time, 3), round(c.objective, 5), c.fidelity, c.epochs_trained,
                                               c.lr, c.wd, round(c.clean, 5)] for c in r.trials])
                                 for r in all_runs[s.name]])
                      for s in settings],
        )
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
        print(f"results written to {args.json}", flush=True)
    return summaries


if __name__ == "__main__":
    main()
