"""`job-verdict`: what a job's workers ran (their records, --worker-records DIR) and the job's exit
code. Every job ends with it: it imports Oríon's client only when a trial broke (1.7 s of CPU).
"""

import collections
import json
import os
import sys
from pathlib import Path

from . import load_orion
from .database import open_experiment, trials_dir_of

# `orion hunt` exits 0 even when every trial broke. The verdict comes from what the job's workers
# recorded (--worker-records) and from the database, never from their logs.


def read_worker_records(folder: Path) -> list[dict]:
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # A line cut short by a kill.
                continue
    return records


def job_verdict(args) -> int:
    """Says what this job's workers ran and how it ended; exit 1 if a trial broke or was killed, or a
    worker failed (--hunt-status: one that stopped while the search was stuck, among others)."""
    records = read_worker_records(Path(args.worker_records))
    outcomes = collections.Counter(r.get("outcome") for r in records)
    ran = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
    print(f"This job ran {sum(outcomes.values())} trial(s) of experiment {args.experiment}"
          + (f": {ran}" if ran else ""))
    db = f"ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS={args.database}"
    verdict = 0
    if outcomes["broken"]:
        print(f"error: {outcomes['broken']} trial(s) of this job broke; their logs are in "
              f"{trials_dir_of(args)}/<trial id>/train.log", file=sys.stderr)
        verdict = 1
        load_orion()  # Oríon's client, for the experiment's broken trials.
        experiment, trials = open_experiment(args)
        # Past max_broken, Oríon runs no trial of this experiment any more, in any job. (A worker
        # also stops after worker.max_broken, 3, broken trials of its own.)
        broken = sum(t.status == "broken" for t in trials)
        remove = f"remove them with: {db} uv run orion db rm {args.experiment} --status broken --force"
        if broken >= experiment.max_broken:
            print(f"error: experiment {args.experiment} has too many broken trials ({broken}, max_broken "
                  f"{experiment.max_broken}) and runs nothing more: fix the cause (a broken trial's train.log), "
                  f"then {remove}", file=sys.stderr)
        else:
            print(f"error: experiment {args.experiment} has {broken} broken trial(s); at {experiment.max_broken} "
                  f"(max_broken) it runs nothing more. Once the cause is fixed, {remove}", file=sys.stderr)
    if outcomes["killed"]:
        # Its worker stopped; the trial is `interrupted` and the next worker resumes it (docs/preemption.md).
        print(f"error: {outcomes['killed']} trial(s) of this job were killed (SIGKILL: out of host memory?); they "
              "resume in the next job or worker. If it keeps happening: sacct -j "
              f"{os.environ.get('SLURM_JOB_ID', '<job id>')} --format=JobID,State,MaxRSS", file=sys.stderr)
        verdict = 1
    if args.hunt_status != 0 and verdict == 0:
        print(f"error: a worker of this job failed (exit status {args.hunt_status}; see above)", file=sys.stderr)
        verdict = 1
    return verdict


