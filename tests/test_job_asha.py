"""job.sh with ALGORITHM=asha, on a real single-node Slurm cluster: promotions resume from the lower rung."""


import pytest
from orion.client import get_experiment

import orion_tools

from conftest import database, make_job_env, read_metrics, sbatch_wait, trials_dir

# --- An ASHA search of two workers under Slurm -------------------------------------------


@pytest.fixture(scope="module")
def asha_search(slurm_env, tmp_path_factory):
    """An ASHA search of 8 trials by two workers (--epochs is the fidelity: rungs of 2, 4, 10).

    Returns Oríon's trials and, by trial id, the records of its metrics.jsonl.
    """
    tmp_path = tmp_path_factory.mktemp("asha")
    job_env = make_job_env(tmp_path, size=100)
    code, output = sbatch_wait(slurm_env, job_env, tmp_path, "--array=1-2", "job.sh", "--batch-size", "32",
                               ALGORITHM="asha", ORION_MAX_TRIALS=8)
    assert code == 0, output
    trials = get_experiment("orion-example", storage=orion_tools.storage(database(job_env))).fetch_trials()
    return trials, {t.id: read_metrics(trials_dir(job_env) / t.id) for t in trials}, trials_dir(job_env)


def test_asha_runs_its_budget(asha_search):
    trials, _, _ = asha_search
    assert [t.status for t in trials] == ["completed"] * 8


def test_asha_promotions_resume_from_the_lower_rung(asha_search):
    trials, _, folder = asha_search
    promoted = [t for t in trials if t.parent is not None]
    assert promoted, "ASHA promoted no trial"
    for trial in promoted:
        parent = next(t for t in trials if t.id == trial.parent)
        resumed = f"Resuming training at epoch {parent.params['/epochs']}"
        assert resumed in (folder / trial.id / "train.log").read_text()


def test_asha_promotes_only_finished_trials(asha_search):
    # Oríon's issue 395 reports ASHA promoting unfinished trials with several workers: a
    # promotion would then copy a folder whose trial is still training. Not seen here.
    trials, _, _ = asha_search
    by_id = {t.id: t for t in trials}
    unfinished = [t.id for t in trials if t.parent is not None and by_id[t.parent].end_time > t.submit_time]
    assert unfinished == []


def test_asha_trains_fewer_epochs_than_without_reuse(asha_search):
    trials, metrics, _ = asha_search
    # A promoted trial's folder starts as a copy of its parent's: the same records, once trained.
    trained = {record["end_time"] for records in metrics.values() for record in records}
    assert len(trained) < sum(t.params["/epochs"] for t in trials)


def test_asha_trains_no_epoch_of_a_configuration_twice(asha_search):
    trials, metrics, _ = asha_search
    runs_of_epoch = {}  # (configuration, epoch) -> when it was trained
    for trial in trials:
        configuration = tuple(value for name, value in sorted(trial.params.items()) if name != "/epochs")
        for record in metrics[trial.id]:
            runs_of_epoch.setdefault((configuration, record["epoch"]), set()).add(record["end_time"])
    assert [key for key, runs in runs_of_epoch.items() if len(runs) > 1] == []
