#!/usr/bin/env bash
# A one-node SLURM on localhost, for the launcher tests and for trying sweeps without a cluster.
#
#   bash launcher/slurm_local.sh start    # installs slurm-wlm and munge if missing, starts the daemons
#   bash launcher/slurm_local.sh status   # daemons and sinfo
#   bash launcher/slurm_local.sh stop     # cancels the jobs, waits for their steps (30 s at most), stops the
#                                         # daemons by pid; no srun or slurmstepd of a job is left behind
#   eval "$(bash launcher/slurm_local.sh env)"   # SLURM_CONF for sbatch, squeue, scancel ...
#
# Everything lives in $NANOLLAMA_SLURM_DIR (default /tmp/nanollama-slurm). Needs root (apt, SlurmUser=root).
set -euo pipefail

DIR="${NANOLLAMA_SLURM_DIR:-/tmp/nanollama-slurm}"
CONF="$DIR/slurm.conf"
CPUS="${NANOLLAMA_SLURM_CPUS:-$(nproc --all)}"  # --all: nproc alone follows OMP_NUM_THREADS

install() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return
    if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
        echo "error: slurm-wlm and munge are missing and cannot be installed here (needs root and apt)" >&2
        exit 2
    fi
    echo "installing slurm-wlm and munge with apt"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$DIR/apt.log" 2>&1 ||
        { echo "error: apt-get install slurm-wlm munge failed, see $DIR/apt.log" >&2; exit 2; }
}

write_config() {
    mkdir -p "$DIR/munge" "$DIR/state" "$DIR/spool" "$DIR/log"
    chmod 755 "$DIR" "$DIR/munge"
    [ -f "$DIR/munge.key" ] || { head -c 1024 /dev/urandom >"$DIR/munge.key"; chmod 400 "$DIR/munge.key"; }
    cat >"$CONF" <<EOF
ClusterName=nanollama
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${NANOLLAMA_SLURM_PORT:-6817}
SlurmdPort=$(( ${NANOLLAMA_SLURM_PORT:-6817} + 1 ))
AuthType=auth/munge
# cred_expire: also how long a requeued job waits before it starts again (SLURM default 120 s)
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=${NANOLLAMA_SLURM_CRED_EXPIRE:-10}
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ReturnToService=2
KillWait=30
MinJobAge=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start() {
    mkdir -p "$DIR"
    install
    if pid_alive "$DIR/slurmctld.pid"; then
        echo "already running (stop it first)"; status; return
    fi
    write_config
    munged -F --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge.key" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge.seed" \
        >/dev/null 2>&1 &
    echo $! >"$DIR/munged.pid.bg"
    for _ in $(seq 50); do [ -S "$DIR/munge/munge.socket" ] && break; sleep 0.1; done
    export SLURM_CONF="$CONF"
    slurmctld -D -f "$CONF" >>"$DIR/log/slurmctld.out" 2>&1 &
    echo $! >"$DIR/slurmctld.pid.bg"
    slurmd -D -N localhost -f "$CONF" >>"$DIR/log/slurmd.out" 2>&1 &
    echo $! >"$DIR/slurmd.pid.bg"
    for _ in $(seq 100); do
        if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
            echo "SLURM is up: node localhost idle, $CPUS cpus; export SLURM_CONF=$CONF"
            return
        fi
        sleep 0.2
    done
    echo "error: the node did not become idle in 20 s; logs in $DIR/log" >&2
    stop >/dev/null
    exit 1
}

# Pids of the processes of this SLURM's jobs: its slurmstepds (they inherit SLURM_CONF=$CONF from slurmd), any
# job process (SLURM_JOB_ID set, the submitter's SLURM_CONF=$CONF) and everything below them (batch script,
# srun, tasks); never this script or its callers, even when `stop` runs inside a job.
job_pids() {
    local file pid roots=""
    for file in $(grep -lzxF "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null); do
        pid="${file#/proc/}"; pid="${pid%/environ}"
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = slurmstepd ] || grep -qz '^SLURM_JOB_ID=' "$file" 2>/dev/null
        then roots+=" $pid"; fi
    done
    [ -n "$roots" ] || return 0
    ps -eo pid=,ppid=,stat= | awk -v roots="$roots" -v me="$$" '
        $3 !~ /^Z/ { parent[$1] = $2 }  # zombies are dead already
        END {
            for (p = me; p in parent && !(p in mine); p = parent[p]) mine[p] = 1
            n = split(roots, r, " ")
            for (i = 1; i <= n; i++) if (r[i] in parent && !(r[i] in mine)) job[r[i]] = 1
            do { grew = 0; for (p in parent) if (!(p in job) && !(p in mine) && (parent[p] in job)) { job[p] = 1; grew = 1 } } while (grew)
            for (p in job) print p
        }'
}

# Cancel every job and wait (up to NANOLLAMA_SLURM_STOP_WAIT s) for their steps to end: srun and slurmstepd only
# finish while the daemons are up, and would otherwise wait forever on a stopped controller. Whatever is left
# after the bound (a task ignoring SIGTERM outlives SLURM's KillWait too) is killed.
cancel_jobs() {
    local jobs deadline=$(( SECONDS + ${NANOLLAMA_SLURM_STOP_WAIT:-30} ))
    if pid_alive "$DIR/slurmctld.pid.bg"; then
        jobs="$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
        if [ -n "${jobs// /}" ]; then
            echo "cancelling job(s) $jobs"
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" scancel $jobs 2>/dev/null || true
            while [ "$SECONDS" -lt "$deadline" ]; do
                [ -z "$(SLURM_CONF="$CONF" squeue -h -o %A 2>/dev/null)" ] && [ -z "$(job_pids)" ] && break
                sleep 0.5
            done
        fi
    fi
    local left; left="$(job_pids | tr '\n' ' ')"
    if [ -n "${left// /}" ]; then
        echo "killing leftover job processes $left"
        # shellcheck disable=SC2086
        kill -KILL $left 2>/dev/null || true
        for _ in $(seq 50); do [ -z "$(job_pids)" ] && break; sleep 0.1; done
    fi
}

stop() {
    cancel_jobs
    for name in slurmd slurmctld munged; do
        for pidfile in "$DIR/$name.pid.bg" "$DIR/$name.pid"; do
            if pid_alive "$pidfile"; then kill "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true; fi
        done
    done
    for name in slurmd slurmctld munged; do
        for _ in $(seq 50); do pid_alive "$DIR/$name.pid.bg" || break; sleep 0.1; done
        if pid_alive "$DIR/$name.pid.bg"; then kill -KILL "$(cat "$DIR/$name.pid.bg")" 2>/dev/null || true; fi
        rm -f "$DIR/$name.pid.bg"
    done
    rm -rf "$DIR/state" "$DIR/spool"
    echo "SLURM stopped"
}

status() {
    for name in munged slurmctld slurmd; do
        if pid_alive "$DIR/$name.pid.bg"; then echo "$name: running (pid $(cat "$DIR/$name.pid.bg"))"
        else echo "$name: stopped"; fi
    done
    if pid_alive "$DIR/slurmctld.pid.bg"; then SLURM_CONF="$CONF" sinfo; fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: bash launcher/slurm_local.sh start|status|stop|env" >&2; exit 2 ;;
esac
