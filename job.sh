#!/bin/bash
# Hyperparameter search of main.py with Oríon, as a Slurm job array: every array task runs
# one (or several) Oríon workers; all of them share one PickledDB database in $SCRATCH.
#
#   sbatch --array=1-10 job.sh [main.py arguments]     # 10 workers, one GPU each
#   ORION_MAX_TRIALS=2 bash job.sh --epochs 1            # no Slurm: a dry run, on a workstation
#
# Variants, settings (environment variables), what ends up where, and the steps below in
# words: see README, "job.sh".
#
# --- Slurm options (command-line options override these lines of the same name) ---------
# A GPU for the *job*, not per task (--gpus-per-task): Slurm refuses --gpus-per-task
# together with --ntasks-per-gpu, which the several-workers-per-GPU variant needs.
#SBATCH --gpus=1
# No --ntasks: one task by default (one Oríon worker, one trial at a time on the GPU), and
# --ntasks-per-gpu=5 on the command line gives five. (An #SBATCH --ntasks line would win
# over --ntasks-per-gpu and keep it at one.)
#SBATCH --cpus-per-task=4
# Host memory per GPU: enough for five trials on one GPU (see README, "Performance").
#SBATCH --mem-per-gpu=16G
#SBATCH --time=01:00:00
# Preemption and the time limit: see README, "Preemption", and step 6.
#SBATCH --requeue
# A requeued job appends to its output file instead of overwriting what the first run wrote.
#SBATCH --open-mode=append
# "B:": SIGUSR1 to this script only, not to the trials (step 6).
#SBATCH --signal=B:USR1@120
#SBATCH --job-name=orion-example

set -euo pipefail
# Step 3 takes back only the trials that no worker has touched since this moment.
job_started_at=$(date +%s.%N)

# --- 1. Check and defaults -------------------------------------------------------------
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
# $SLURM_TMPDIR (fast node-local disk, wiped after the job) is a site convention set by
# the cluster's prolog, not stock Slurm: fail clearly where a cluster lacks it.
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
export CIFAR10_ARCHIVE="${CIFAR10_ARCHIVE:-/network/datasets/cifar10/cifar-10-python.tar.gz}"
export CIFAR10_URL="${CIFAR10_URL:-https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz}"
export CIFAR10_MD5="c58f30108f718f92721af3b95e74349a"  # Published with the archive (and in torchvision).
export CIFAR10_BYTES=170498071  # The official archive's size: the space to stage it (step 2).
ORION_EXPERIMENT="${ORION_EXPERIMENT:-orion-example}"
# The search's defaults follow from how many workers start together (the tasks of this job
# times the jobs of the array); why these: README, "The search".
concurrent_workers=$(( ${SLURM_NTASKS:-1} * ${SLURM_ARRAY_TASK_COUNT:-1} ))
ORION_MAX_TRIALS="${ORION_MAX_TRIALS:-$(( concurrent_workers > 5 ? 5 * concurrent_workers : 25 ))}"
TPE_N_INITIAL_POINTS="${TPE_N_INITIAL_POINTS:-$(( concurrent_workers > 5 ? concurrent_workers : 5 ))}"
ALGORITHM="${ALGORITHM:-tpe}"
if ! [[ "$ORION_MAX_TRIALS" =~ ^[1-9][0-9]*$ && "$TPE_N_INITIAL_POINTS" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: ORION_MAX_TRIALS=$ORION_MAX_TRIALS and TPE_N_INITIAL_POINTS=$TPE_N_INITIAL_POINTS" \
        "must be positive integers, e.g. export ORION_MAX_TRIALS=50" >&2
    exit 1
fi
# The search space: one prior per hyperparameter of main.py (README, "Make it yours").
priors=(
    --learning-rate~'loguniform(1e-5, 1.0)'
    --weight-decay~'loguniform(1e-6, 1e-1)'
)
# The algorithm (README, "The search").
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
for argument in "$@"; do
    for name in "${priors[@]%%~*}" --checkpoint-dir -h --help; do
        if [[ "$argument" == "$name" || "$argument" == "$name="* ]]; then
            echo "error: $name cannot follow job.sh: job.sh or Oríon sets it (the priors: job.sh," \
                "step 1); remove it" >&2
            exit 1
        fi
    done
done
# The database and the trials of every search with this script. Named after the example,
# not after $ORION_EXPERIMENT: the experiments share the one database. A dry run has its
# own, whatever ORION_DB_ADDRESS says: it never touches the search that sbatch runs.
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
export ORION_HEARTBEAT="${ORION_HEARTBEAT:-30}"  # Why 30 s: see README, "Preemption".
if ! [[ "$ORION_HEARTBEAT" =~ ^[0-9]+$ ]] || (( ORION_HEARTBEAT <= 12 )); then
    echo "error: ORION_HEARTBEAT=$ORION_HEARTBEAT: use a whole number of seconds above 12 (README," \
        "\"Preemption\"), e.g. the default, 30" >&2
    exit 1
fi
# The trials' folders (checkpoints, train.log) persist in $SCRATCH: a requeued or another
# worker resumes an interrupted trial there. Without --working-dir, Oríon deletes them.
trials_dir="$search_dir/$ORION_EXPERIMENT"
for folder in "$trials_dir" "$(dirname "$ORION_DB_ADDRESS")"; do
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

# --- 2. Stage the data (once per node) and the environment (once) ----------------------
# Trials then read CIFAR-10 from the node's local disk, never from the shared filesystem.
# shellcheck disable=SC2317  # Run by `bash -c stage_node` below.
stage_node() {
    set -euo pipefail
    local data_dir="$SLURM_TMPDIR/data" archive_bytes=$CIFAR10_BYTES needed_mb free_mb advice
    # The archive and its extracted files (CIFAR-10: 171 + 186 MB), 2.2 x the archive with a margin.
    if [[ -f "$CIFAR10_ARCHIVE" ]]; then
        archive_bytes=$(stat --format=%s "$CIFAR10_ARCHIVE")
    fi
    needed_mb=$(( archive_bytes * 22 / 10 / 1000000 + 1 ))
    free_mb=$(( $(df --output=avail --block-size=1000000 "$SLURM_TMPDIR" | tail -n 1) ))
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then
        advice="ask for nodes with more local disk (sbatch --tmp=${needed_mb}M, where the cluster sets it)"
    else
        advice="export TMPDIR=a folder with more space (this dry run's \$SLURM_TMPDIR is made there)"
    fi
    if (( free_mb < needed_mb )); then
        echo "error: SLURM_TMPDIR=$SLURM_TMPDIR on $(hostname) has $free_mb MB free, and staging" \
            "CIFAR-10 needs about $needed_mb MB (the archive and its extracted files): $advice" >&2
        return 1
    fi
    local failed="error: staging CIFAR-10 in SLURM_TMPDIR=$SLURM_TMPDIR failed (above; it had $free_mb MB free"
    failed+=" for about $needed_mb MB): $advice"
    mkdir -p "$data_dir"
    if [[ -f "$CIFAR10_ARCHIVE" ]]; then
        cp "$CIFAR10_ARCHIVE" "$data_dir/cifar-10-python.tar.gz" || { echo "$failed" >&2; return 1; }
    else
        echo "CIFAR10_ARCHIVE=$CIFAR10_ARCHIVE does not exist: downloading $CIFAR10_URL"
        if ! curl --fail --silent --show-error --location --retry 2 \
                --output "$data_dir/cifar-10-python.tar.gz" "$CIFAR10_URL"; then
            echo "error: CIFAR10_ARCHIVE=$CIFAR10_ARCHIVE does not exist and the download failed" \
                "(no internet on compute nodes?): export CIFAR10_ARCHIVE=/path/to/cifar-10-python.tar.gz" >&2
            return 1
        fi
        if ! echo "$CIFAR10_MD5  $data_dir/cifar-10-python.tar.gz" | md5sum --check --quiet --status; then
            echo "error: the download of $CIFAR10_URL is not the official archive (MD5 mismatch):" \
                "export CIFAR10_ARCHIVE=/path/to/cifar-10-python.tar.gz" >&2
            return 1
        fi
    fi
    # Extract once here so that the trials don't each extract it.
    tar --extract --gzip --file "$data_dir/cifar-10-python.tar.gz" --directory "$data_dir" \
        || { echo "$failed" >&2; return 1; }
}
export -f stage_node
"${on_each_node[@]}" bash -c stage_node

# The environment, .venv in this (shared) folder: once per job, not per node. Ready when the
# login node's `uv sync --locked --compile-bytecode` made it: then this costs a fraction of a
# second. Otherwise (uv.lock changed since, or it was synced without bytecode) the first task
# syncs, offline, under a lock, and the tasks that waited find it done; no task writes .venv
# while another imports from it.
environment_ready() {
    uv sync --offline --locked --check --quiet 2>/dev/null \
        && compgen -G ".venv/lib/python3*/site-packages/orion/__pycache__/__init__.cpython-*.pyc" >/dev/null
}
if ! environment_ready; then
    # flock on the shared filesystem (NFS, GPFS, Lustre mounted with flock); `exec 9>` keeps
    # the lock file open for the lock's lifetime, which ends with this subshell.
    if ! ( exec 9>>.venv-sync.lock && flock 9 && { environment_ready \
            || uv sync --offline --locked --compile-bytecode --quiet; } ); then
        # Compute nodes have no internet: the uv cache must hold every package.
        echo "error: uv could not set up the environment offline: run 'uv sync --locked --compile-bytecode'" \
            "once on a machine with internet (e.g. the login node), then submit again" >&2
        exit 1
    fi
fi
# The workers run from the synced environment directly, not through `uv run`: uv forwards
# SIGTERM to its child, which then gets it twice (Slurm signals every process of the
# step), and Oríon's hunt gives up on a trial at the second SIGTERM.
# shellcheck disable=SC1091
source .venv/bin/activate

# --- 3. Check the database, take back the trials of a requeued job ---------------------
# An emptied or truncated database (a crash of the file server) would start the search
# over: stop instead, and say how to restore the copy the last job made. First, before
# anything opens the database: Oríon writes an emptied file back as a valid empty database.
python orion_tools.py check-database --database "$ORION_DB_ADDRESS" --experiment "$ORION_EXPERIMENT"

# Why take trials back: see README, "Preemption". Which trials: `reclaim` in orion_tools.py.
if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then
    python orion_tools.py reclaim --database "$ORION_DB_ADDRESS" --experiment "$ORION_EXPERIMENT" \
        --trials-dir "$trials_dir" --job-id "$SLURM_JOB_ID" --since "$job_started_at"
fi

# --- 4. Configure Oríon ------------------------------------------------------------------
# A typo in main.py's arguments would break every trial, one after the other, until the
# experiment is broken for good: check them once, here (needs the environment of step 2).
if ! python -c 'import sys, main; sys.argv[0] = "main.py"; main.parse_args()' "$@"; then
    echo "error: main.py refuses the arguments after job.sh (see above): correct them and submit again" >&2
    exit 2
fi
# What each trial runs: main.py with this job's arguments and the priors (Oríon replaces each
# prior with a value).
trial_command=(python main.py --checkpoint-dir '{trial.working_dir}' "$@" "${priors[@]}")
# A malformed prior fails the hunt's start with a traceback, and an experiment that ran
# before with other main.py arguments, priors or algorithm would go on, its trials mixed with
# the old ones: refuse both, here. (A larger ORION_MAX_TRIALS extends a search; its algorithm
# keeps the settings it started with, e.g. TPE's n_initial_points: `check-experiment` in
# orion_tools.py prints them.)
algorithm=$(python orion_tools.py check-experiment --database "$ORION_DB_ADDRESS" \
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
    # LazyWorkers. (A worker with nothing left to run exits at once: orion_tools.py hunt.)
    idle_timeout: 1800
    # Run the trial in the worker process itself: on SIGTERM it then waits for main.py to
    # checkpoint and exit 130, and marks the trial "interrupted" (the default process-pool
    # executor's child dies at once and the trial was left "reserved").
    executor: singleexecutor
storage:
    database:
        type: pickleddb
        host: $ORION_DB_ADDRESS
        # Seconds a worker waits for the database's lock (Oríon's default: 60). Above
        # orion_tools.py's DATABASE_LOCK_LIFETIME, so a lock left by a killed worker is broken
        # before anyone gives up (README, "Many workers on one database").
        timeout: 120
EOF

# For `uv run orion info/plot` as written: see README, "Quick start".
global_config="${XDG_CONFIG_HOME:-$HOME/.config}/orion.core/orion_config.yaml"
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

# --- 5. Run the workers ------------------------------------------------------------------
# Each worker asks the database for a trial, runs main.py with its hyperparameters, reports,
# and asks again. `orion_tools.py hunt`: `orion hunt` with an exact budget (README, "The search").
# Several workers may share a GPU: keep their CPU threads within the task's CPUs.
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-4}"
hunt=(
    "${on_each_task[@]}"
    python orion_tools.py hunt -n "$ORION_EXPERIMENT" --config "$orion_config" --working-dir "$trials_dir"
    "${trial_command[@]}"
)
# In the background, so that this script takes signals while they run (step 6). The output
# also goes to a file, to count this job's broken trials (step 7).
hunt_log="$SLURM_TMPDIR/hunt.log"
"${hunt[@]}" > >(tee "$hunt_log") 2>&1 &
hunt_pid=$!

# --- 6. Preemption -----------------------------------------------------------------------
# What each signal does to a trial: see README, "Preemption". Near the time limit, Slurm
# signals only this script (--signal=B:USR1): pass SIGTERM on to every process of the
# job's steps, wait for the trials to checkpoint, and requeue the job. (Not `kill -TERM`
# to srun: srun takes it as "abort the step" and kills the trials a few seconds later,
# checkpoint or not.)
near_time_limit=false
# shellcheck disable=SC2317  # Called by the trap below.
forward_to_workers() {
    near_time_limit=true
    scancel --signal=TERM "$SLURM_JOB_ID"
}
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    trap forward_to_workers USR1
fi
trap 'true' TERM  # Slurm signals the workers directly; wait for them to finish saving.
hunt_status=0
while true; do
    wait "$hunt_pid" && hunt_status=0 || hunt_status=$?
    # `wait` also returns (> 128) when a trapped signal arrives; the hunt may still run.
    kill -0 "$hunt_pid" 2>/dev/null || break
done
wait  # ... and for `tee` to write the last lines.
if [[ "$near_time_limit" == true ]]; then
    echo "Time limit near: trials checkpointed; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi

# --- 7. Verdict --------------------------------------------------------------------------
# `orion hunt` exits 0 even when every trial broke: count Oríon's per-trial error lines.
broken_trials=$(grep -c "::ERROR::orion.client.runner::" "$hunt_log" || true)
verdict=$hunt_status
if (( broken_trials > 0 )); then
    echo "error: $broken_trials trial(s) of this job broke; their logs are in $trials_dir/<trial id>/train.log" >&2
    verdict=1
    # Past max_broken, Oríon runs no trial of this experiment any more, in any job.
    if grep -q "Trials failed too many times\|Worker has reached broken trials threshold" "$hunt_log"; then
        echo "error: experiment $ORION_EXPERIMENT has too many broken trials and runs nothing more: fix the" \
            "cause (a broken trial's train.log), then remove them with: ORION_DB_TYPE=pickleddb" \
            "ORION_DB_ADDRESS=$ORION_DB_ADDRESS uv run orion db rm $ORION_EXPERIMENT --status broken --force" >&2
    fi
# A trial killed with SIGKILL (out of host memory?) stopped its worker (orion_tools.py hunt);
# the trial is `interrupted` and the next worker resumes it (README, "How a trial ends").
elif (( hunt_status != 0 )) && grep -q "error: the trial was killed (SIGKILL" "$hunt_log"; then
    echo "error: a trial of this job was killed (above); its worker stopped, and the trial resumes in" \
        "the next job or worker. If it keeps happening: sacct -j ${SLURM_JOB_ID:-<job id>} --format=JobID,State,MaxRSS" >&2
    verdict=1
# An ASHA worker that waited idle_timeout for a rung to fill stops with `LazyWorkers`: its
# job is done, not failed.
elif (( hunt_status != 0 )) && grep -q "LazyWorkers" "$hunt_log"; then
    echo "No trial left for this worker: done."
    verdict=0
fi
# The output ends with what this job did (main.py logs one "Objective" line per trial it
# finishes) and where the search stands (README, "What you see at the end"). A report that
# fails or hangs (kaleido's Chromium) fails no job.
trials_run=$(grep -c "Objective (1 - validation accuracy)" "$hunt_log" || true)
echo "This job ran $trials_run trial(s) of experiment $ORION_EXPERIMENT."
if ! timeout 600 python orion_tools.py report --if-done --experiment "$ORION_EXPERIMENT" \
        --database "$ORION_DB_ADDRESS" --trials-dir "$trials_dir"; then
    echo "warning: the search's report failed; make it again with: ORION_DB_ADDRESS=$ORION_DB_ADDRESS" \
        "uv run python orion_tools.py report --experiment $ORION_EXPERIMENT --trials-dir $trials_dir" >&2
    python orion_tools.py summary --experiment "$ORION_EXPERIMENT" --database "$ORION_DB_ADDRESS" || true
fi
if [[ "$dry_run" == true ]]; then
    echo "Dry run: its trials are in $trials_dir, apart from the search that sbatch runs. See them with:" \
        "ORION_DB_TYPE=pickleddb ORION_DB_ADDRESS=$ORION_DB_ADDRESS uv run orion info -n $ORION_EXPERIMENT"
fi
exit "$verdict"
