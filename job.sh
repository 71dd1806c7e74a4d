#!/bin/bash
# Hyperparameter search of main.py with Oríon, as a Slurm job array: every array task runs one
# (or several) Oríon workers; all of them share one PickledDB database in $SCRATCH.
#
#   sbatch --array=1-10 job.sh [main.py arguments]     # 10 workers, one GPU each
#   ORION_MAX_TRIALS=2 bash job.sh --epochs 1            # no Slurm: a dry run, on a workstation
#
# Settings (environment variables), variants and what ends up where: docs/job.md. The job
# is `main`, below: seven steps; each step's function follows it, in the same order.
#
# A GPU for the *job*, not per task: Slurm refuses --gpus-per-task with --ntasks-per-gpu, which
# the several-workers-per-GPU variant (--ntasks-per-gpu=5) needs. No --ntasks line: it would win
# over --ntasks-per-gpu. Command-line options override these lines of the same name.
#SBATCH --gpus=1
#SBATCH --cpus-per-task=4
#SBATCH --mem-per-gpu=16G
#SBATCH --time=01:00:00
# Preemption and the time limit (step 6): requeue, append to the same output file, and SIGUSR1
# to this script only ("B:") two minutes before the end.
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --job-name=orion-example

# `sh job.sh` would stop at the first bash-only line with a syntax error: say so first.
if [ -z "${BASH_VERSION:-}" ]; then echo "error: run job.sh with bash (or sbatch), not sh" >&2; exit 1; fi

# The search space: a prior per hyperparameter of main.py that Oríon searches (README, "Make it
# yours"); Oríon replaces each with a value in every trial. ASHA adds --epochs (step 1). The
# learning rate stops at 1e-2: above it AdamW trains ResNet18 poorly or not at all, and a prior
# up to 1.0 spent two fifths of its trials there (docs/search.md; benchmarks/prior_fit.py).
priors=(
    --learning-rate~'loguniform(1e-5, 1e-2)'
    --weight-decay~'loguniform(1e-6, 1e-1)'
)

main() {
    set -euo pipefail
    job_started_at=$(date +%s.%N)  # Step 3 takes back only trials no worker touched since.
    check_and_set_defaults "$@"    # 1. Slurm or a dry run; the settings, the algorithm, $SCRATCH.
    set_up_environment "$@"        # 2. The environment (once), main.py's arguments, the data (per node).
    check_database                 # 3. Refuse a damaged database; take back a requeued job's trials.
    configure_orion "$@"           # 4. The experiment's settings; Oríon's configuration file.
    run_workers                    # 5. The workers, under srun, in the background ...
    wait_and_forward_preemption    # 6. ... while this script forwards a time-limit signal and requeues.
    report_verdict                 # 7. What this job ran and where the search stands; the exit code.
}

# --- 1. Check and defaults -------------------------------------------------------------------------
check_and_set_defaults() {
    echo "Date:     $(date)"
    echo "Hostname: $(hostname)"
    # sbatch runs a copy of this script, in the folder it was submitted from.
    if [[ ! -f main.py ]]; then
        echo "error: main.py is not in $PWD: cd to the folder holding main.py and job.sh, then submit" >&2
        exit 1
    fi
    # The one place that tells Slurm from a workstation: how to run once per node and once per task.
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        # srun inherits --ntasks-per-gpu from the job through the environment, and refuses it
        # together with --ntasks-per-node.
        on_each_node=(env -u SLURM_NTASKS_PER_GPU
                      srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1)
        on_each_task=(srun)
        dry_run=false
    else
        # A dry run: a temporary folder plays $SLURM_TMPDIR (made in $TMPDIR), ./scratch plays
        # $SCRATCH, and the search keeps to a folder of its own there (below).
        SLURM_TMPDIR="$(mktemp -d)"
        trap 'rm -rf "$SLURM_TMPDIR"' EXIT
        export SLURM_TMPDIR
        export SCRATCH="${SCRATCH:-$PWD/scratch}"
        on_each_node=()
        on_each_task=()
        dry_run=true
    fi
    # $SLURM_TMPDIR (fast node-local disk, wiped after the job) is a site convention set by the
    # cluster's prolog, not stock Slurm: fail clearly where a cluster lacks it.
    if [[ -z "${SLURM_TMPDIR:-}" ]]; then
        echo "error: \$SLURM_TMPDIR is not set: this cluster has no per-job local folder;" \
            "export SLURM_TMPDIR=/some/local/tmp, then submit again" >&2
        exit 1
    fi
    if [[ -z "${SCRATCH:-}" ]]; then
        echo "error: \$SCRATCH is not set: export SCRATCH=/a/shared/folder of yours, which every node can" \
            "write to, for the database and the trials; then submit again" >&2
        exit 1
    fi
    ORION_EXPERIMENT="${ORION_EXPERIMENT:-orion-example}"
    # The search's defaults follow from how many workers start together (the tasks of this job
    # times the jobs of the array); why these: docs/search.md.
    local concurrent_workers=$(( ${SLURM_NTASKS:-1} * ${SLURM_ARRAY_TASK_COUNT:-1} ))
    ORION_MAX_TRIALS="${ORION_MAX_TRIALS:-$(( concurrent_workers > 5 ? 5 * concurrent_workers : 25 ))}"
    TPE_N_INITIAL_POINTS="${TPE_N_INITIAL_POINTS:-$(( concurrent_workers > 5 ? concurrent_workers : 5 ))}"
    ALGORITHM="${ALGORITHM:-tpe}"
    if ! [[ "$ORION_MAX_TRIALS" =~ ^[1-9][0-9]*$ && "$TPE_N_INITIAL_POINTS" =~ ^[1-9][0-9]*$ ]]; then
        echo "error: ORION_MAX_TRIALS=$ORION_MAX_TRIALS and TPE_N_INITIAL_POINTS=$TPE_N_INITIAL_POINTS" \
            "must be positive integers, e.g. export ORION_MAX_TRIALS=50" >&2
        exit 1
    fi
    # The algorithm (docs/search.md).
    case "$ALGORITHM" in
        tpe)
            algorithm="tpe: {seed: null, n_initial_points: $TPE_N_INITIAL_POINTS}" ;;
        asha)
            # seed: null, or Oríon's ASHA repeats its configurations and stalls after ~10 rounds.
            algorithm="asha: {seed: null, num_brackets: 2}"
            priors+=(--epochs~'fidelity(2, 10, base=2)') ;;
        random)
            algorithm="random: {seed: null}" ;;
        *)
            echo "error: ALGORITHM=$ALGORITHM: use tpe (the default), asha or random" >&2
            exit 1 ;;
    esac
    # Arguments after job.sh that Oríon or job.sh set themselves would clash in every trial.
    local argument name
    for argument in "$@"; do
        for name in "${priors[@]%%~*}" --checkpoint-dir -h --help; do
            if [[ "$argument" == "$name" || "$argument" == "$name="* ]]; then
                echo "error: $name cannot follow job.sh: job.sh or Oríon sets it (the priors: top of" \
                    "job.sh); remove it" >&2
                exit 1
            fi
        done
    done
    # The database and the trials of every search with this script. Named after the example, not
    # after $ORION_EXPERIMENT: the experiments share the one database. A dry run has its own,
    # whatever ORION_DB_ADDRESS says: it never touches the search that sbatch runs.
    if [[ "$dry_run" == true ]]; then
        search_dir="$SCRATCH/orion-example-dry-run"
        if [[ -n "${ORION_DB_ADDRESS:-}" && "$ORION_DB_ADDRESS" != "$search_dir/orion_db.pkl" ]]; then
            echo "Dry run: ORION_DB_ADDRESS=$ORION_DB_ADDRESS is for jobs under Slurm; ignored"
        fi
        ORION_DB_ADDRESS="$search_dir/orion_db.pkl"
        echo "Dry run (no Slurm): database and trials in $search_dir, apart from the search that" \
            "sbatch runs ($SCRATCH/orion-example)"
    else
        search_dir="$SCRATCH/orion-example"
    fi
    # Oríon reads these two in every command (hunt, info, plot, status), whatever the config says.
    export ORION_DB_TYPE=pickleddb
    export ORION_DB_ADDRESS="${ORION_DB_ADDRESS:-$search_dir/orion_db.pkl}"
    export ORION_HEARTBEAT="${ORION_HEARTBEAT:-30}"  # Why 30 s: see docs/preemption.md.
    # Every job of one search must use the same (orion_tools hunt refuses another in one line).
    if ! [[ "$ORION_HEARTBEAT" =~ ^[1-9][0-9]{0,3}$ ]] || (( ORION_HEARTBEAT < 5 )); then
        echo "error: ORION_HEARTBEAT=$ORION_HEARTBEAT: use a whole number of seconds from 5 to 9999" \
            "(docs/preemption.md), e.g. the default, 30" >&2
        exit 1
    fi
    # The trials' folders (checkpoints, train.log) persist in $SCRATCH: a requeued or another
    # worker resumes an interrupted trial there. Without --working-dir, Oríon deletes them.
    trials_dir="$search_dir/$ORION_EXPERIMENT"
    # What each worker records of the trials it runs (orion_tools hunt --worker-records).
    worker_records="$search_dir/workers/${SLURM_JOB_ID:-dry-run-$$}"
    local folder problem where probe
    for folder in "$trials_dir" "$(dirname "$ORION_DB_ADDRESS")" "$worker_records"; do
        # Make it and write in it: a read-only folder can exist.
        if ! problem=$( { mkdir -p "$folder" && probe=$(mktemp "$folder/.job.sh-write-test.XXXXXX") \
                          && rm "$probe"; } 2>&1 ); then
            where="\$SCRATCH=$SCRATCH must be a folder"
            if [[ "$folder" != "$SCRATCH"/* ]]; then where="\$ORION_DB_ADDRESS=$ORION_DB_ADDRESS must be in a folder"; fi
            echo "error: cannot write in $folder (${problem##*: }): $where of yours that every node can" \
                "write to; export another, then submit again" >&2
            exit 1
        fi
    done
}

# --- 2. The environment (once), main.py's arguments, the data (once per node) ----------------------
set_up_environment() {
    # .venv in this (shared) folder: ready when the login node's `uv sync --locked
    # --compile-bytecode` made it, and then this costs a fraction of a second. Otherwise (uv.lock
    # changed since, or it was synced without bytecode) the first task syncs, offline, under a
    # lock (flock, on the shared filesystem), and the tasks that waited find it done.
    if ! environment_ready; then
        echo "The environment (.venv) is out of date or has no bytecode: syncing it, offline"
        # `exec 9>>` keeps the lock file open, and so the lock held, until the subshell ends.
        if ! ( exec 9>>.venv-sync.lock && flock 9 && { environment_ready \
                || uv sync --offline --locked --compile-bytecode --quiet; } ); then
            # Compute nodes have no internet: the uv cache must hold every package.
            echo "error: uv could not set up the environment offline: run 'uv sync --locked --compile-bytecode'" \
                "once on a machine with internet (e.g. the login node), then submit again" >&2
            exit 1
        fi
    fi
    # The workers run from the environment directly, not through `uv run`: uv forwards SIGTERM to
    # its child, which then gets it twice (Slurm signals every process of the step), and Oríon's
    # hunt gives up on a trial at the second SIGTERM.
    # shellcheck disable=SC1091
    source .venv/bin/activate
    # A typo in main.py's arguments, or a prior wider than they allow, would break trial after
    # trial until the experiment is broken for good: check them once, here (orion_tools/checks.py,
    # check_trial_arguments). main.py names its data set module (`import ... as dataset`), which
    # stages the data on each node's local disk, $SLURM_TMPDIR, once, before the workers start:
    # trials then never read from the shared filesystem.
    local data_module
    data_module=$(python -c 'import sys, main; from orion_tools.checks import check_trial_arguments
sys.argv[0] = "main.py"; check_trial_arguments(main, sys.argv[1:])' "$@" "${priors[@]}")
    "${on_each_node[@]}" python -m orion_tools stage-data --module "$data_module" --destination "$SLURM_TMPDIR/data"
}

environment_ready() {
    uv sync --offline --locked --check --quiet 2>/dev/null \
        && compgen -G ".venv/lib/python3*/site-packages/orion/core/__pycache__/__init__.cpython-*.pyc" >/dev/null
}

# --- 3. Check the database, take back the trials of a requeued job ----------------------------------
check_database() {
    # An emptied or truncated database (a crash of the file server) would start the search over:
    # stop instead, and say how to restore the copy the last job made. Before anything opens the
    # database: Oríon writes an emptied file back as a valid empty database.
    python -m orion_tools check-database --database "$ORION_DB_ADDRESS" --experiment "$ORION_EXPERIMENT"
    # Why take trials back: see docs/preemption.md. Which trials: `reclaim` in orion_tools.
    if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
        python -m orion_tools reclaim --database "$ORION_DB_ADDRESS" --experiment "$ORION_EXPERIMENT" \
            --trials-dir "$trials_dir" --job-id "$SLURM_JOB_ID" --since "$job_started_at"
    fi
}

# --- 4. Configure Oríon ----------------------------------------------------------------------------
configure_orion() {
    # What each trial runs: main.py with this job's arguments and the priors.
    trial_command=(python main.py --checkpoint-dir '{trial.working_dir}' "$@" "${priors[@]}")
    # A malformed prior fails the hunt's start with a traceback, and an experiment that ran before
    # with other main.py arguments, priors or algorithm would go on, its trials mixed with the old
    # ones: refuse both, here. (A larger ORION_MAX_TRIALS extends a search; its algorithm keeps the
    # settings it started with, e.g. TPE's n_initial_points: `check-experiment` prints them.)
    algorithm=$(python -m orion_tools check-experiment --database "$ORION_DB_ADDRESS" \
        --experiment "$ORION_EXPERIMENT" --algorithm "$algorithm" -- "${trial_command[@]}")
    orion_config="$SLURM_TMPDIR/orion-config.yml"
    cat > "$orion_config" <<EOF
experiment:
    algorithm:
        $algorithm
    max_trials: $ORION_MAX_TRIALS
    max_broken: 10
worker:
    # ASHA's workers may wait several epochs for a rung to fill: not Oríon's 60 s, then
    # LazyWorkers. (A worker with nothing left to run exits at once: orion_tools hunt.)
    idle_timeout: 1800
    # Run the trial in the worker process itself: on SIGTERM it then waits for main.py to
    # checkpoint and exit 130, and marks the trial "interrupted" (the default process-pool
    # executor's child dies at once and the trial was left "reserved").
    executor: singleexecutor
storage:
    database:
        type: pickleddb
        host: $ORION_DB_ADDRESS
        # Seconds a command waits for the database's lock (Oríon's default: 60), above
        # orion_tools' DATABASE_LOCK_LEASE (90 s) after which a lock left by a killed worker
        # is taken over; hunt's workers wait as long as it takes (docs/many-workers.md).
        timeout: 120
EOF
    # For `uv run orion info/plot` as written: see README, "Quick start".
    local global_config="${XDG_CONFIG_HOME:-$HOME/.config}/orion.core/orion_config.yaml"
    if [[ "$dry_run" == true ]]; then
        :  # Step 7 says how to see a dry run's database.
    elif [[ ! -f "$global_config" ]]; then
        mkdir -p "$(dirname "$global_config")"
        printf 'storage:\n    database:\n        type: pickleddb\n        host: %s\n' "$ORION_DB_ADDRESS" > "$global_config"
        echo "Wrote $global_config: Oríon commands now read $ORION_DB_ADDRESS"
    elif ! grep -qF "$ORION_DB_ADDRESS" "$global_config"; then
        echo "warning: $global_config names another database; to see this search, run" \
            "ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS=$ORION_DB_ADDRESS uv run orion info -n $ORION_EXPERIMENT" >&2
    fi
}

# --- 5. Run the workers -----------------------------------------------------------------------------
run_workers() {
    # Each worker asks the database for a trial, runs main.py with its hyperparameters, reports,
    # and asks again. `python -m orion_tools hunt`: `orion hunt` with an exact budget, that records each
    # trial it ran in --worker-records (docs/search.md). Several workers may share a GPU:
    # keep their CPU threads within the task's CPUs.
    export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-4}"
    # In the background, so that this script takes signals while they run (step 6).
    "${on_each_task[@]}" python -m orion_tools hunt --worker-records "$worker_records" \
        -n "$ORION_EXPERIMENT" --config "$orion_config" --working-dir "$trials_dir" "${trial_command[@]}" &
    hunt_pid=$!
}

# --- 6. Preemption ------------------------------------------------------------------------------------
# What each signal does to a trial: see docs/preemption.md. Near the time limit, Slurm signals
# only this script (--signal=B:USR1): pass SIGTERM on to every process of the job's steps, wait
# for the trials to checkpoint, and requeue the job. (Not `kill -TERM` to srun: srun takes it as
# "abort the step" and kills the trials a few seconds later, checkpoint or not.)
wait_and_forward_preemption() {
    near_time_limit=false
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        trap 'near_time_limit=true; scancel --signal=TERM "$SLURM_JOB_ID"' USR1
    fi
    trap 'true' TERM  # Slurm signals the workers directly; wait for them to finish saving.
    hunt_status=0
    while true; do
        wait "$hunt_pid" && hunt_status=0 || hunt_status=$?
        # `wait` also returns (> 128) when a trapped signal arrives; the hunt may still run.
        kill -0 "$hunt_pid" 2>/dev/null || break
    done
    if [[ "$near_time_limit" == true ]]; then
        echo "Time limit near: trials checkpointed; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
}

# --- 7. Verdict ---------------------------------------------------------------------------------------
report_verdict() {
    # `orion hunt` exits 0 even when every trial broke: `job-verdict` reads what the workers
    # recorded and the database, says what this job ran and where the search stands, and exits
    # non-zero if a trial of this job broke or was killed, or a worker failed. A report that
    # fails or hangs (kaleido's Chromium) fails no job.
    local verdict=0
    python -m orion_tools job-verdict --worker-records "$worker_records" --hunt-status "$hunt_status" \
        --experiment "$ORION_EXPERIMENT" --database "$ORION_DB_ADDRESS" --trials-dir "$trials_dir" || verdict=$?
    if ! timeout 600 python -m orion_tools report --if-done --experiment "$ORION_EXPERIMENT" \
            --database "$ORION_DB_ADDRESS" --trials-dir "$trials_dir"; then
        echo "warning: the search's report failed; make it again with: ORION_DB_ADDRESS=$ORION_DB_ADDRESS" \
            "uv run python -m orion_tools report --experiment $ORION_EXPERIMENT --trials-dir $trials_dir" >&2
        python -m orion_tools summary --experiment "$ORION_EXPERIMENT" --database "$ORION_DB_ADDRESS" || true
    fi
    if [[ "$dry_run" == true ]]; then
        echo "Dry run: its trials are in $trials_dir, apart from the search that sbatch runs. See them with:" \
            "ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS=$ORION_DB_ADDRESS uv run orion info -n $ORION_EXPERIMENT"
    fi
    exit "$verdict"
}

main "$@"
