#!/usr/bin/env bash
# Start / stop a REAL single-node Slurm cluster on this machine, for the tests
# and for CI (Debian 12, root, no systemd, no cgroups).
#
#   eval "$(bash tests/slurm/cluster.sh start STATE_DIR)"   # sets SLURM_CONF
#   bash tests/slurm/cluster.sh stop STATE_DIR
#
# `start` installs Debian's packages if missing, wipes STATE_DIR, writes the
# whole configuration into it (never /etc/slurm), starts munged (unless one is
# already running), slurmctld and slurmd, waits until the node is idle, and
# prints exactly one line on stdout: `export SLURM_CONF=STATE_DIR/slurm.conf`.
# Everything else goes to stderr.
# `stop` cancels every job, then stops only the daemons that `start` recorded
# in STATE_DIR/*.pid, and waits for them to exit. It is idempotent.
#
# The node pretends to be a GPU box (64 cores, 256 GiB, 16 x gpu:l40s) whatever
# this machine has, so that job scripts written for the real cluster are
# accepted and scheduled unchanged. Nothing runs on a GPU: the "devices" are
# symlinks to /dev/null. Room for the tests' jobs side by side (pytest's workers
# share one cluster: tests/conftest.py, slurm_env).
#
# Environment knobs (all optional):
#   SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT  ports (default 6817 / 6818)
#   SLURM_TEST_START_TIMEOUT  seconds to wait for the node to be idle (30)
set -euo pipefail

# Keep the real stdout on fd 3 for the single `export` line; everything else,
# including the output of the commands we run, goes to stderr so that
# `eval "$(cluster.sh start DIR)"` only ever sees that line.
exec 3>&1 1>&2

# Debian puts the daemons in /usr/sbin, which is not on every caller's PATH.
export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:${PATH:-}"

PACKAGES=(slurmctld slurmd slurm-client munge)
CTLD_PORT="${SLURM_TEST_CTLD_PORT:-6817}"
SLURMD_PORT="${SLURM_TEST_SLURMD_PORT:-6818}"
START_TIMEOUT="${SLURM_TEST_START_TIMEOUT:-30}"
GPU_TYPE=l40s
GPU_COUNT=16

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { printf 'cluster.sh: error: %s\n' "$*" >&2; exit 1; }

usage() {
    die "usage: $0 {start|stop} STATE_DIR"
}

# ---------------------------------------------------------------- helpers --

# running PID: the process exists and is not a zombie (one that exited but
# whose parent, PID 1 in a container, has not reaped it yet).
running() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# is_ours PIDFILE NAME: the pid recorded in PIDFILE is running and is NAME
# (guards against killing an unrelated process that reused the pid).
is_ours() {
    local pidfile=$1 name=$2 pid comm
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    # /proc/PID/comm is cut at 15 characters.
    [[ $comm == "${name:0:15}" ]] && running "$pid"
}

# munged_running: some munged (not a zombie) runs on this machine.
munged_running() {
    local pid
    for pid in $(pgrep -x munged || true); do
        running "$pid" && return 0
    done
    return 1
}

# stop_daemons PIDFILE:NAME...: SIGTERM them all at once (each takes ~2 s to
# shut down), wait up to 20 s, then SIGKILL what is left.
stop_daemons() {
    local spec pidfile name i alive
    for spec in "$@"; do
        pidfile=${spec%:*} name=${spec##*:}
        if is_ours "$pidfile" "$name"; then
            log "stopping $name (pid $(<"$pidfile"))"
            kill -TERM "$(<"$pidfile")" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < 250; i++)); do
        alive=()
        for spec in "$@"; do
            is_ours "${spec%:*}" "${spec##*:}" && alive+=("$spec")
        done
        ((${#alive[@]} == 0)) && break
        if ((i == 200)); then
            for spec in "${alive[@]}"; do
                log "${spec##*:} ignored SIGTERM, killing it"
                kill -KILL "$(<"${spec%:*}")" 2>/dev/null || true
            done
        fi
        sleep 0.1
    done
    ((${#alive[@]} == 0)) || die "does not exit: ${alive[*]}"
    for spec in "$@"; do
        rm -f "${spec%:*}"
    done
}

# kill_tree PID...: SIGKILL these processes and all their descendants
# (descendants first collected, then stopped, so none can fork away).
kill_tree() {
    local all=("$@") i=0 child
    while ((i < ${#all[@]})); do
        for child in $(pgrep -P "${all[i]}" || true); do
            all+=("$child")
        done
        i=$((i + 1))
    done
    kill -STOP "${all[@]}" 2>/dev/null || true
    kill -KILL "${all[@]}" 2>/dev/null || true
}

ensure_packages() {
    local missing=() cmd
    for cmd in slurmctld slurmd sinfo sbatch scancel munged munge unmunge; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
    done
    ((${#missing[@]} == 0)) && return 0

    [[ $(id -u) -eq 0 ]] ||
        die "Slurm is not installed (missing: ${missing[*]}) and installing it needs root; run as root or: apt-get install ${PACKAGES[*]}"
    command -v apt-get >/dev/null 2>&1 ||
        die "Slurm is not installed (missing: ${missing[*]}) and apt-get is unavailable (a Debian/Ubuntu machine is needed)"

    log "installing ${PACKAGES[*]}"
    # `apt-get update` only when the package lists do not know the packages
    # (a fresh machine/container ships without lists).
    if ! apt-cache show "${PACKAGES[@]}" >/dev/null 2>&1; then
        apt-get update -q || die "apt-get update failed"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${PACKAGES[@]}" || die "apt-get install ${PACKAGES[*]} failed"
}

# Start munged as the munge user unless some munged already serves the
# default socket (the package may have started one; several clusters on one
# machine share it). munge is Slurm's authentication: without it nothing works.
start_munge() {
    local state=$1 key=/etc/munge/munge.key i pid

    if munged_running; then
        log "munged already running, using it"
    else
        if [[ ! -s $key ]]; then
            log "creating $key"
            install -d -o munge -g munge -m 0700 /etc/munge
            if command -v mungekey >/dev/null 2>&1; then
                mungekey --create --keyfile="$key" --force
            elif command -v create-munge-key >/dev/null 2>&1; then
                create-munge-key -f
            else
                dd if=/dev/urandom of="$key" bs=1 count=1024 status=none
            fi
        fi
        # munged refuses to start unless the key is private to munge.
        chown munge:munge "$key"
        chmod 0400 "$key"
        # /run is a tmpfs on a real machine: the socket dir vanishes at boot
        # and nothing (no systemd here) recreates it.
        install -d -o munge -g munge -m 0755 /run/munge
        install -d -o munge -g munge -m 0700 /var/log/munge
        install -d -o munge -g munge -m 0711 /var/lib/munge

        log "starting munged"
        rm -f /run/munge/munged.pid
        # runuser forks and waits, so $! would not be munged's pid: let
        # munged daemonize (it returns once its socket is ready) and take
        # the pid from its own pid file.
        runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1 3>&- ||
            die "munged failed to start, see /var/log/munge/munged.log"
        for ((i = 0; i < 50; i++)); do
            [[ -s /run/munge/munged.pid ]] && break
            sleep 0.1
        done
        pid=$(cat /run/munge/munged.pid 2>/dev/null) || die "munged wrote no pid file"
        echo "$pid" >"$state/munged.pid"
    fi

    for ((i = 0; i < 50; i++)); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "munge does not work (munge -n | unmunge fails), see /var/log/munge/munged.log"
}

write_config() {
    local state=$1 host=$2

    # Fake GPUs. Slurm needs one device file per GPU (File=) to hand out
    # CUDA_VISIBLE_DEVICES; measured: they must be SYMLINKS to a device
    # (/dev/null), as regular files, or Count= without File=, do not work.
    mkdir -p "$state/dev"
    local i
    for ((i = 0; i < GPU_COUNT; i++)); do
        ln -s /dev/null "$state/dev/nvidia$i"
    done

    # $SLURM_TMPDIR is a site convention of the real cluster, not stock
    # Slurm: a per-job scratch dir. Prolog (root, on the node, at allocation)
    # creates it, TaskProlog (as the user, before the batch script and before
    # every srun task) exports it, Epilog (root) removes it.
    # Prolog/Epilog must never fail: a failing one DRAINS the node and every
    # later job pends forever.
    mkdir -p "$state/tmp"
    chmod 0755 "$state" "$state/tmp"
    cat >"$state/prolog.sh" <<EOF
#!/bin/sh
d="$state/tmp/slurm-\$SLURM_JOB_ID"
mkdir -p "\$d" && chown "\${SLURM_JOB_UID:-0}:\${SLURM_JOB_GID:-0}" "\$d" && chmod 0700 "\$d"
exit 0
EOF
    cat >"$state/task_prolog.sh" <<EOF
#!/bin/sh
# Lines "export NAME=VALUE" printed by a TaskProlog go into the task's env.
echo "export SLURM_TMPDIR=$state/tmp/slurm-\$SLURM_JOB_ID"
EOF
    cat >"$state/epilog.sh" <<EOF
#!/bin/sh
rm -rf "$state/tmp/slurm-\$SLURM_JOB_ID"
exit 0
EOF
    chmod 0755 "$state/prolog.sh" "$state/task_prolog.sh" "$state/epilog.sh"

    cat >"$state/gres.conf" <<EOF
# Written by tests/slurm/cluster.sh. Slurm reads gres.conf from the folder of
# slurm.conf. No NVML here, so no autodetection: the GPUs are declared.
AutoDetect=off
NodeName=$host Name=gpu Type=$GPU_TYPE File=$state/dev/nvidia[0-$((GPU_COUNT - 1))]
EOF

    cat >"$state/slurm.conf" <<EOF
# Written by tests/slurm/cluster.sh: a throw-away single-node test cluster.
ClusterName=test
# The address in parentheses avoids any DNS lookup of the host name.
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may not start again before the job credential expired
# (default 120 s: \`scontrol requeue\` then looks like a hang, Reason=BeginTime).
AuthInfo=cred_expire=10

# Everything lives in the state dir, so a wipe is a full reset.
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool
SlurmctldPidFile=$state/slurmctld.pidfile
SlurmdPidFile=$state/slurmd.pidfile
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info

SchedulerType=sched/backfill
# Cores and memory are consumable, GPUs are tracked (cons_tres is needed for
# --gpus, --gpus-per-task, --mem-per-gpu, --ntasks-per-gpu).
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without this a job with no memory request gets the WHOLE node's memory
# (DefMemPerNode=0 means "all") and jobs never share the node.
DefMemPerCPU=4096
# No cgroups in a container: pgid tracking. NOT proctrack/linuxproc: with it
# the processes of a killed batch script survive scancel / requeue.
ProctrackType=proctrack/pgid
# task/affinity and task/cgroup need what a container lacks.
TaskPlugin=task/none
# No slurmdbd: no accounting, so sacct does not work (use scontrol/squeue).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
# Jobs with --mail-type must not fail for want of a mailer.
MailProg=/bin/true

# An impossible request (more GPUs/cores/memory than the node has) is rejected
# at submission instead of pending forever.
EnforcePartLimits=ALL
# Let slurmd advertise the NodeName line below rather than the real hardware
# (2 cores, no GPU): without it the node is drained for "low resources".
SlurmdParameters=config_overrides
# A node that was DOWN (e.g. slurmd restarted late) comes back by itself.
ReturnToService=2
# Batch jobs may be requeued (scontrol requeue, node failure).
JobRequeue=1

# Short timers, to keep tests fast.
# Finished jobs stay visible to scontrol/squeue for 5 minutes (no sacct).
MinJobAge=300
# Seconds between SIGTERM and SIGKILL when a job is cancelled or times out.
KillWait=5
InactiveLimit=0
SlurmdTimeout=60

Prolog=$state/prolog.sh
Epilog=$state/epilog.sh
TaskProlog=$state/task_prolog.sh
# Run the Prolog when the job is allocated (so \$SLURM_TMPDIR exists before
# the batch script starts), not lazily at the first srun step.
PrologFlags=Alloc

GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=64 Sockets=1 CoresPerSocket=64 ThreadsPerCore=1 RealMemory=262144 Gres=gpu:$GPU_TYPE:$GPU_COUNT State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

# spawn STATE NAME CMD...: run a daemon in the foreground (-D), detached from
# our session and from every fd of the caller (a caller that captures our
# output, like subprocess.run, would otherwise wait for the daemons to exit),
# and record its pid.
spawn() {
    local state=$1 name=$2
    shift 2
    # In a non-interactive script a background child is not a process group
    # leader, so setsid execs (no fork) and $! is the daemon itself.
    SLURM_CONF="$state/slurm.conf" setsid "$@" </dev/null >>"$state/$name.out" 2>&1 3>&- &
    echo $! >"$state/$name.pid"
}

dump_logs() {
    local state=$1 f
    for f in slurmctld.log slurmd.log slurmctld.out slurmd.out; do
        [[ -s $state/$f ]] || continue
        printf '%s\n' "----- tail of $state/$f -----" >&2
        tail -n 30 "$state/$f" >&2
    done
}

# ---------------------------------------------------------------- actions --

do_stop() {
    local state=$1 i
    if [[ ! -d $state ]]; then
        log "nothing to stop in $state"
        return 0
    fi
    export SLURM_CONF="$state/slurm.conf"

    if is_ours "$state/slurmctld.pid" slurmctld; then
        # Cancel every job and give them KillWait (+ margin) to end, so that
        # slurmd kills their processes and runs the Epilog before it stops:
        # a slurmstepd left behind would keep the job's processes alive.
        local jobs
        jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
        if [[ -n ${jobs// /} ]]; then
            log "cancelling jobs: $jobs"
            # shellcheck disable=SC2086  # word splitting wanted: one id per word
            timeout 10 scancel $jobs || true
            for ((i = 0; i < 150; i++)); do
                [[ -z $(timeout 5 squeue -h -t PD,R,CG,S,CF -o %A 2>/dev/null || echo x) ]] && break
                sleep 0.2
            done
        fi
    fi

    # munged.pid exists only if we started munged; one that was already
    # running stays.
    stop_daemons "$state/slurmd.pid:slurmd" "$state/slurmctld.pid:slurmctld" \
        "$state/munged.pid:munged"

    # Job step daemons, and so the jobs' processes, outlive slurmd. Normally
    # none is left after the scancel above; if slurmctld was already dead,
    # kill the steps of this cluster (found by the SLURM_CONF that slurmd
    # passed on to them) and everything below them.
    local pid pids=()
    for pid in $(pgrep -x slurmstepd || true); do
        if tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qxF "SLURM_CONF=$state/slurm.conf"; then
            pids+=("$pid")
        fi
    done
    if ((${#pids[@]})); then
        log "killing leftover job steps: ${pids[*]}"
        kill_tree "${pids[@]}"
    fi
    log "stopped"
}

do_start() {
    local state=$1 host deadline st

    ensure_packages
    [[ $(id -u) -eq 0 ]] || die "starting the test cluster needs root (munged, slurmd run as root)"

    # A previous cluster in this dir: stop it first, or its daemons keep the
    # ports and the wipe below would lose their pids.
    if [[ -d $state ]]; then
        do_stop "$state"
    fi
    rm -rf "$state"
    mkdir -p "$state"/{ctld,spool}

    host=$(hostname -s)
    write_config "$state" "$host"
    start_munge "$state"

    export SLURM_CONF="$state/slurm.conf"
    log "starting slurmctld"
    spawn "$state" slurmctld slurmctld -D -f "$SLURM_CONF"
    log "starting slurmd -N $host"
    # -N: this node's name in slurm.conf (the short host name).
    spawn "$state" slurmd slurmd -D -N "$host" -f "$SLURM_CONF"

    deadline=$((SECONDS + START_TIMEOUT))
    while :; do
        st=$(timeout 5 sinfo -h -N -n "$host" -o %T 2>/dev/null || true)
        [[ $st == idle ]] && break
        if ! is_ours "$state/slurmctld.pid" slurmctld || ! is_ours "$state/slurmd.pid" slurmd; then
            dump_logs "$state"
            do_stop "$state"
            die "a Slurm daemon exited during start-up (logs above, in $state)"
        fi
        if ((SECONDS >= deadline)); then
            dump_logs "$state"
            do_stop "$state"
            die "node $host not idle after ${START_TIMEOUT}s (state: '${st:-no answer}'; logs above, in $state)"
        fi
        sleep 0.5
    done
    log "cluster up: node $host idle, SLURM_CONF=$SLURM_CONF"
    printf 'export SLURM_CONF=%q\n' "$SLURM_CONF" >&3
}

# ------------------------------------------------------------------- main --

(($# == 2)) || usage
action=$1
[[ -n $2 ]] || usage
# Absolute, normalised: the path is written into the config files.
state=$(realpath -m -- "$2")
[[ $state != / ]] || die "refusing to use / as STATE_DIR"
# Slurm's config parser does not handle blanks in paths.
[[ $state != *[[:space:]]* ]] || die "STATE_DIR must not contain blanks: $state"

case $action in
start) do_start "$state" ;;
stop) do_stop "$state" ;;
*) usage ;;
esac
