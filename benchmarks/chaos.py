"""Chaos: randomized faults against real `python -m orion_tools hunt` workers, and the invariant
checker run on every search (issue 24). The harness and the checker are tests/chaos.py (read its
docstring: the faults, their targets, the invariants); tests/test_chaos.py runs two searches of
this series in the suite (`run_series`).

Each search is one seed: the seed alone draws its algorithm (TPE or random), workers (4-6),
budget (10-16) and faults (4-8 of: a worker's process group SIGKILLed and replaced; SIGSTOPped
0.5 s to --max-stall, log-uniform; the database's filesystem full or read-only 0.5 s to
--max-filesystem; a worker stopped inside a database or algorithm-lock hold), their starts,
durations and target rules, so `--seeds 17` runs search 17 again with the same faults. Timings are
scaled down (tests/chaos.py, `Timings`): ORION_HEARTBEAT=2, lease 4 s, algorithm-lock takeover
6 s, database lock wait 8 s, trials of 2-6 s: a search takes 0.5-3 minutes.

    uv run python benchmarks/chaos.py --searches 50 --json benchmarks/outputs/chaos.json
    uv run python benchmarks/chaos.py --seeds 17 --keep          # search 17 again, its folder kept
    uv run python benchmarks/chaos.py --seeds 1..5 --workers 5 --budget 12 --repo /tmp/other-checkout

Prints one line per search (its violations under it) and a summary: searches run, faults
injected by kind, searches complete, invariant violations. Exit 1 on any violation (or a harness
error). Needs root for the database's own tmpfs (mount): without it, the database goes to
/dev/shm and the filesystem faults are skipped, as the summary says. A search's folder (the
database, each worker's output and records, result.json) is kept when it has a violation.
"""

import argparse
import collections
import importlib.util
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import common  # Puts tests/ and the repository on sys.path.

HARNESS = common.REPO_ROOT / "tests" / "chaos.py"


def load_harness():
    """tests/chaos.py: the copy already imported (the suite imports it as `chaos`), else loaded as
    `chaos_harness` (`import chaos` here would import this very script)."""
    for name in ("chaos", "chaos_harness"):
        module = sys.modules.get(name)
        if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == HARNESS:
            return module
    spec = importlib.util.spec_from_file_location("chaos_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Its dataclasses look their module up there.
    spec.loader.exec_module(module)
    return module


chaos = load_harness()


def parse_seeds(spec: str) -> list:
    """`1..50` (inclusive), `3,7,9`, or a mix: `1..3,10`."""
    seeds = []
    for part in spec.split(","):
        part = part.strip()
        if ".." in part:
            first, last = (int(x) for x in part.split(".."))
            if last < first:
                raise ValueError(f"empty range {part}")
            seeds += range(first, last + 1)
        elif part:
            seeds.append(int(part))
    if not seeds:
        raise ValueError(f"no seed in {spec!r}")
    return seeds


def run_series(seeds: list, root: Path, workers: int | None = None, budget: int | None = None,
               algorithm: str | None = None, faults: int | None = None, kinds: list | None = None,
               max_stall: float = 60.0, max_filesystem: float = 30.0, timeout: float = 600.0,
               repo: Path = chaos.REPO_ROOT, keep: bool = False, out=print) -> dict:
    """Runs one search per seed in folders under `root`; returns every search's result and the summary."""
    results = []
    started = time.time()
    for seed in seeds:
        plan = chaos.plan_search(seed, workers=workers, budget=budget, algorithm=algorithm, faults=faults,
                                 kinds=kinds, max_stall=max_stall, max_filesystem=max_filesystem, repo=repo)
        folder = Path(root) / f"seed-{seed}"
        result = chaos.run_search(plan, folder, timeout=timeout, repo=repo)
        results.append(result)
        out(chaos.one_line(result))
        for violation in result["violations"]:
            out(f"    violation: {violation}")
        for error in result["harness_errors"]:
            out(f"    harness error: {error}")
        if result["violations"] or result["harness_errors"]:
            out(f"    kept: {folder}")
        elif not keep:
            shutil.rmtree(folder, ignore_errors=True)
    applied = chaos.applied_by_kind(results)
    planned = {kind: sum(r["kind"] == kind for result in results for r in result["faults"]) for kind in chaos.KINDS}
    summary = {
        "searches": len(results),
        "seconds": round(time.time() - started),
        "faults_injected": sum(applied.values()),
        "faults_planned": sum(planned.values()),
        "faults_by_kind": {kind: {"injected": applied[kind], "planned": planned[kind]} for kind in chaos.KINDS},
        "faults_not_injected": dict(collections.Counter(
            r["skipped"].split(":")[0] for result in results for r in result["faults"] if r.get("skipped"))),
        "faults_on_confirmed_holders": sum(r.get("holder") == "confirmed"
                                           for result in results for r in result["faults"]),
        "searches_complete": sum(result["completed"] == result["budget"] for result in results),
        "violations": sum(len(result["violations"]) for result in results),
        "searches_with_violations": [result["seed"] for result in results if result["violations"]],
        "harness_errors": sum(len(result["harness_errors"]) for result in results),
        "filesystem_faults": sorted({result["filesystem_faults"] for result in results}),
        "hook": sorted({result["hook"] for result in results}),
    }
    return {"results": results, "summary": summary}


def print_summary(summary: dict, out=print) -> None:
    kinds = ", ".join(f"{kind} {n['injected']}/{n['planned']}" for kind, n in summary["faults_by_kind"].items())
    out(f"searches: {summary['searches']} in {summary['seconds']} s; complete (budget reached): "
        f"{summary['searches_complete']} of {summary['searches']}")
    out(f"faults injected: {summary['faults_injected']} of {summary['faults_planned']} planned ({kinds}; "
        f"{summary['faults_on_confirmed_holders']} on a confirmed lock holder)")
    if summary["faults_not_injected"]:
        out("not injected: " + "; ".join(f"{n} x {why}" for why, n in summary["faults_not_injected"].items()))
    hook = {(True,): "used", (False,): "absent: lock holders found by looking"}.get(tuple(summary["hook"]), "mixed")
    out(f"filesystem faults: {'; '.join(summary['filesystem_faults'])}; test hook ORION_TOOLS_TEST_PAUSE: {hook}")
    out(f"invariant violations: {summary['violations']}"
        + (f" (seeds {', '.join(map(str, summary['searches_with_violations']))})" if summary["violations"] else "")
        + (f"; HARNESS ERRORS: {summary['harness_errors']}" if summary["harness_errors"] else ""))


def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", help="which searches: 1..50, 3,7,9 (default: 1..--searches)")
    parser.add_argument("--searches", type=int, default=10, help="searches 1..N, without --seeds (default 10)")
    parser.add_argument("--workers", type=int, help="workers per search (default: drawn, 4-6)")
    parser.add_argument("--budget", type=int, help="max_trials per search (default: drawn, 10-16)")
    parser.add_argument("--algorithm", choices=["tpe", "random"], help="(default: drawn)")
    parser.add_argument("--faults", type=int, help="faults per search (default: drawn, 4-8)")
    parser.add_argument("--kinds", help="these faults, in this order, in every search: a comma list of "
                        + ", ".join(chaos.KINDS))
    parser.add_argument("--max-stall", type=float, default=60.0, help="longest SIGSTOP or slow hold, s (default 60)")
    parser.add_argument("--max-filesystem", type=float, default=30.0,
                        help="longest full or read-only filesystem, s (default 30)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="a search still running then is killed, a violation (default 600 s)")
    parser.add_argument("--repo", type=Path, default=chaos.REPO_ROOT,
                        help="the checkout whose orion_tools the workers run (default: this one)")
    parser.add_argument("--folder", type=Path, help="where the searches' folders go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true",
                        help="keep every search's folder (else only those with a problem)")
    parser.add_argument("--json", type=Path, help="write every search's result and the summary here")
    args = parser.parse_args()
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else list(range(1, args.searches + 1))
        kinds = [kind.strip() for kind in args.kinds.split(",")] if args.kinds else None
        if kinds and not set(kinds) <= set(chaos.KINDS):
            raise ValueError(f"--kinds: one of {', '.join(chaos.KINDS)}")
    except ValueError as error:
        parser.error(str(error))
    signal.signal(signal.SIGTERM, interrupted)  # As Ctrl-C: the workers killed, the tmpfs unmounted.
    common.print_header("Chaos: randomized faults against hunt workers, an invariant checker on each search", args)
    root = args.folder or Path(tempfile.mkdtemp(prefix="chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"searches in {root}; orion_tools of {args.repo}; timings {chaos.Timings()}", flush=True)
    series = run_series(seeds, root, workers=args.workers, budget=args.budget, algorithm=args.algorithm,
                        faults=args.faults, kinds=kinds, max_stall=args.max_stall, max_filesystem=args.max_filesystem,
                        timeout=args.timeout, repo=args.repo, keep=args.keep,
                        out=lambda line: print(line, flush=True))
    print()
    print_summary(series["summary"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join([Path(sys.executable).name, *sys.argv]),
                                         "machine": f"{common.cpu_model()}, {common.cpu_count()} CPUs",
                                         "orion_tools": str(args.repo), **series}, indent=1, default=str))
        print(f"wrote {args.json}")
    if not args.keep and not any(root.iterdir()) and not args.folder:
        root.rmdir()
    summary = series["summary"]
    return 1 if summary["violations"] or summary["harness_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
