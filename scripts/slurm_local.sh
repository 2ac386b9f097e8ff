#!/usr/bin/env bash
# slurm_local.sh - a real one-node SLURM cluster on localhost, for tests and CI.
#
#   scripts/slurm_local.sh start  DIR   install if needed, write the config under DIR, start every
#                                       daemon; exit 0 once `sinfo` shows the node idle and `sacct`
#                                       answers. The last line on stdout is
#                                           export SLURM_CONF=/abs/DIR/etc/slurm.conf
#                                       so a caller can `eval "$(scripts/slurm_local.sh start DIR | tail -n1)"`.
#   scripts/slurm_local.sh stop   DIR   cancel the jobs, stop every daemon that `start` started (by the
#                                       pid files under DIR); idempotent, also fine after a failed start.
#   scripts/slurm_local.sh status DIR   exit 0 if the cluster in DIR is up and answering, else 1.
#
# Exit status 3 (with one line on stderr saying what is missing) when SLURM is not installed and cannot
# be: not root, no apt-get, or apt-get failing (no network to the Debian mirror). A test skips on 3.
#
# What it is built for, and what was measured on such a machine (Debian 12, SLURM 22.05.8, MariaDB
# 10.11, root, no systemd, 2 cores, 24 GiB):
#   * apt-get install of slurmctld slurmd slurm-client munge slurmdbd mariadb-server takes ~20-25 s; it
#     is done only when a binary is missing. Starting on a fresh DIR takes ~8-11 s (MariaDB's datadir
#     and SLURM's tables are created), starting again on the same DIR ~3 s, stop ~3 s. The first job
#     after a start waits ~3 s more (slurmctld's first scheduling pass); later ones start in < 1 s.
#   * No systemd: the daemons are started by hand, in this order: munged (system socket /run/munge, run
#     as the munge user; left alone if it was already running), a private mariadbd (datadir, socket, pid
#     file and a TCP port of its own under DIR, so it never touches a MariaDB the machine already runs),
#     slurmdbd, `sacctmgr add cluster`, slurmctld, slurmd. SlurmUser is root; slurmdbd.conf is mode 600.
#   * Accounting is not optional: submitit polls `sacct`. Without slurmdbd a job's state stays UNKNOWN
#     and a job killed from outside leaves `job.result()` waiting forever.
#   * Everything else (slurm.conf, slurmdbd.conf, StateSaveLocation, SlurmdSpoolDir, logs, pid files)
#     lives under DIR, and the ports are derived from DIR's path (override: SLURM_LOCAL_PORT_BASE), so
#     two checkouts do not collide. The only shared piece is the system munged: `stop` ends it only if
#     this DIR started it, and hands it over to another cluster of this script that still runs.
#   * Job output: sbatch's default is slurm-JOBID.out in the submit directory; submitit writes
#     FOLDER/JOBID_0_log.out and .err. A job killed from outside raises UncompletedJobError in
#     job.result() after ~20 s (submitit's polling).
#   * `scancel --signal=USR2 J` signals the job's steps only, not the batch shell: a plain sbatch script
#     that traps USR2 needs `scancel --full --signal=USR2 J` (or -b). submitit runs its python under
#     srun, so plain --signal reaches it.
#   * PID 1 on these machines reaps orphans late: a stopped daemon can linger as <defunct> in ps for a
#     second or two; a check for leftovers should ignore state Z.
#   * Client commands need SLURM_CONF=DIR/etc/slurm.conf in their environment; sbatch passes the
#     submitter's environment on to the job (--export=ALL), so a submitit job gets it, and its PATH and
#     interpreter, from the test process.
#   * --mem is a scheduling quantity only (no cgroup plugin: proctrack/linuxproc, task/none). A request
#     for more CPUs than the node has, or more memory than its RealMemory, does not fail: it stays
#     PENDING forever. Callers keep cpus_per_task <= the node's CPUs (`slurmd -C`; 2 here) and mem_gb
#     below the node's memory. Jobs that ask for nothing get DefMemPerCPU=256 MB.
#   * Requeue works (JobRequeue=1). A requeued job is PENDING (Reason=BeginTime) for cred_expire+1 s
#     before it may run again: SLURM's default is 120 s; AuthInfo=cred_expire=20 here, which measured
#     ~31 s from `scontrol requeue` to RUNNING. A test that does not want to wait sends
#     `scontrol update JobId=J StartTime=now` once the job is PENDING again: RUNNING ~3 s later.
#   * Small MinJobAge/KillWait so that finished and cancelled jobs clear quickly.
set -euo pipefail

export PATH="/usr/sbin:/sbin:/usr/bin:/bin:${PATH:-}"
PROG=slurm_local.sh
PARTITION=local
CLUSTER=rtl
BINARIES=(munged munge unmunge mariadbd mariadb-install-db mariadb mariadb-admin
          slurmdbd slurmctld slurmd sinfo sacct sacctmgr sbatch scontrol squeue scancel)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}   # bound on each readiness wait

die() { echo "$PROG: $*" >&2; exit 1; }
log() { echo "$PROG: $*" >&2; }

usage() { echo "usage: $PROG start|stop|status DIR" >&2; exit 2; }

# ---------------------------------------------------------------------------------------- layout
setup_paths() {
    mkdir -p "$1"
    DIR=$(cd "$1" && pwd -P)
    ETC=$DIR/etc; RUN=$DIR/run; LOGD=$DIR/log; STATE=$DIR/state; DB=$DIR/mysql
    export SLURM_CONF=$ETC/slurm.conf
    local h; h=$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)
    # Unix sockets have a 108-byte path limit: slurmd puts one per job step in its spool dir, and
    # mariadbd has one. For a long DIR they go to a short directory under /tmp named after DIR.
    if (( ${#DIR} <= 60 )); then SOCKD=$DIR/sock; else SOCKD=/tmp/rtl-slurm-$h; fi
    SPOOL=$SOCKD/slurmd
    MYSOCK=$SOCKD/mysqld.sock
    local base=${SLURM_LOCAL_PORT_BASE:-$(( 17000 + (h % 400) * 10 ))}   # 17000..20990, below ephemeral
    CTLD_PORT=$base; SLURMD_PORT=$((base + 1)); DBD_PORT=$((base + 2)); MYSQL_PORT=$((base + 3))
    HOST=$(hostname -s)
}

# true when process $1 exists and is not a zombie (PID 1 here reaps orphans late)
live_pid() { [[ -n $1 && $(awk '/^State:/{print $2}' "/proc/$1/status" 2>/dev/null) =~ ^[RSDTt]$ ]]; }

# true when pid file $1 names a live process whose command is $2
alive() {
    local pid
    [[ -s $1 ]] || return 1
    pid=$(tr -dc '0-9' < "$1")
    live_pid "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$2"* ]]
}

# wait_for SECONDS DESCRIPTION LOGFILE PIDFILE COMM COMMAND...: poll COMMAND until it succeeds; fail
# with the tail of LOGFILE after SECONDS, or sooner once the daemon in PIDFILE (COMM) has been dead
# for 3 s (PIDFILE "-": no such check)
wait_for() {
    local secs=$1 what=$2 logf=$3 pidf=$4 comm=$5; shift 5
    local end=$((SECONDS + secs)) dead=0
    until "$@" >/dev/null 2>&1; do
        if [[ $pidf != - ]] && ! alive "$pidf" "$comm"; then dead=$((dead + 1)); else dead=0; fi
        if (( SECONDS >= end || dead >= 6 )); then
            if (( dead >= 6 )); then log "$comm died while starting; last lines of $logf:"
            else log "$what not ready after ${secs}s; last lines of $logf:"; fi
            tail -n 25 "$logf" >&2 2>/dev/null || true
            exit 1
        fi
        sleep 0.5
    done
}

# kill_pidfile PIDFILE COMM: TERM the process, wait up to 20 s, then KILL; drop the pid file
kill_pidfile() {
    local f=$1 comm=$2 pid i
    if alive "$f" "$comm"; then
        pid=$(tr -dc '0-9' < "$f")
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 40; i++)); do
            live_pid "$pid" || break
            sleep 0.5
        done
        if live_pid "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
        log "stopped $comm ($pid)"
    fi
    rm -f "$f"
}

# ---------------------------------------------------------------------------------------- install
missing_binaries() {
    local b out=()
    for b in "${BINARIES[@]}"; do command -v "$b" >/dev/null 2>&1 || out+=("$b"); done
    echo "${out[*]}"
}

install_if_needed() {
    local missing; missing=$(missing_binaries)
    [[ -z $missing ]] && return 0
    local why=""
    if [[ $(id -u) != 0 ]]; then why="not root"
    elif ! command -v apt-get >/dev/null 2>&1; then why="no apt-get"
    fi
    if [[ -n $why ]]; then
        echo "$PROG: SLURM missing ($missing) and cannot install it: $why" >&2; exit 3
    fi
    mkdir -p "$LOGD"
    local aptlog=$LOGD/apt.log t0=$SECONDS
    # (silent until done: on failure the one line below is all that goes to stderr)
    export DEBIAN_FRONTEND=noninteractive
    # keep the packages' init scripts from starting system daemons during the install
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; own_policy=1
    fi
    local ok=1 apt=(apt-get -q -o DPkg::Lock::Timeout=300)
    if ! apt-cache show slurmctld >/dev/null 2>&1 || [[ -z $(apt-cache policy slurmctld | awk '/Candidate:/{print $2}' | grep -v none) ]]; then
        "${apt[@]}" update >>"$aptlog" 2>&1 || ok=0
    fi
    if (( ok )); then
        "${apt[@]}" install -y --no-install-recommends "${PACKAGES[@]}" >>"$aptlog" 2>&1 || ok=0
    fi
    (( own_policy )) && rm -f /usr/sbin/policy-rc.d
    missing=$(missing_binaries)
    if (( !ok )) || [[ -n $missing ]]; then
        echo "$PROG: SLURM missing (${missing:-?}) and apt-get install failed (no network to the Debian mirror?), see $aptlog" >&2
        exit 3
    fi
    log "installed ${PACKAGES[*]} in $((SECONDS - t0))s (log: $aptlog)"
}

# ---------------------------------------------------------------------------------------- config
write_config() {
    mkdir -p "$ETC" "$RUN" "$LOGD" "$STATE" "$SPOOL" "$SOCKD"
    [[ $SOCKD == "$DIR/sock" ]] || ln -sfn "$SOCKD" "$DIR/sock"   # so one can find it from DIR
    # NodeName line as slurmd sees this machine (CPUs, sockets, cores, threads, RealMemory)
    local node; node=$(slurmd -C | head -n1)
    [[ $node == NodeName=* ]] || die "unexpected output of slurmd -C: $node"
    NODE=$(sed 's/^NodeName=\([^ ]*\).*/\1/' <<<"$node")
    cat > "$ETC/slurm.conf" <<EOF
# written by scripts/slurm_local.sh start $DIR - regenerated on every start
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again only after cred_expire+1 s (default 120)
AuthInfo=cred_expire=20
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOGD/slurmctld.log
SlurmdLogFile=$LOGD/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: memory is a scheduling quantity only
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
JobRequeue=1
MinJobAge=30
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
Waittime=0
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
MailProg=/bin/true
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # slurmdbd looks for slurmdbd.conf next to \$SLURM_CONF; it must be 600 and owned by SlurmUser
    ( umask 077; cat > "$ETC/slurmdbd.conf" <<EOF
# written by scripts/slurm_local.sh start $DIR
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$LOGD/slurmdbd.log
PidFile=$RUN/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    )
    chown root:root "$ETC/slurmdbd.conf"; chmod 600 "$ETC/slurmdbd.conf"
}

# ---------------------------------------------------------------------------------------- daemons
munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munged() {
    if munge_ok; then
        # ours from an earlier start, or the machine's: either way leave it as it is
        [[ -e $RUN/munged.ours ]] && alive "$RUN/munged.pid" munged && return 0
        rm -f "$RUN/munged.ours" "$RUN/munged.pid"; return 0
    fi
    rm -f "$RUN/munged.ours" "$RUN/munged.pid"
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey >/dev/null 2>&1; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged --force 9>&- </dev/null >>"$LOGD/munged.out" 2>&1 \
        || { log "munged failed to start:"; tail -n 10 /var/log/munge/munged.log "$LOGD/munged.out" >&2 || true; exit 1; }
    wait_for "$WAIT_S" munged /var/log/munge/munged.log - - munge_ok
    cp /run/munge/munged.pid "$RUN/munged.pid"
    touch "$RUN/munged.ours"   # stop kills munged only when this file says we started it
}

mysql_client() { mariadb --no-defaults --socket="$MYSOCK" -uroot "$@"; }

start_mariadbd() {
    alive "$RUN/mariadbd.pid" mariadbd && return 0
    rm -f "$RUN/mariadbd.pid" "$MYSOCK"
    if [[ ! -d $DB/mysql ]]; then
        rm -rf "$DB"
        mariadb-install-db --no-defaults --datadir="$DB" --user=root --auth-root-authentication-method=socket \
            --skip-test-db >"$LOGD/mariadb-install.log" 2>&1 \
            || { log "mariadb-install-db failed:"; tail -n 20 "$LOGD/mariadb-install.log" >&2; exit 1; }
    fi
    # setsid: out of the caller's process group, so a Ctrl-C there does not reach it
    setsid mariadbd --no-defaults --datadir="$DB" --socket="$MYSOCK" --port="$MYSQL_PORT" \
        --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$RUN/mariadbd.pid" \
        --log-error="$LOGD/mariadbd.log" --user=root --innodb-buffer-pool-size=64M \
        --innodb-log-file-size=48M --innodb-lock-wait-timeout=900 --max-connections=50 \
        9>&- </dev/null >>"$LOGD/mariadbd.log" 2>&1 &
    echo $! > "$RUN/mariadbd.pid"   # mariadbd rewrites it with the same pid
    wait_for "$WAIT_S" mariadbd "$LOGD/mariadbd.log" "$RUN/mariadbd.pid" mariadbd mariadb-admin --no-defaults --socket="$MYSOCK" -uroot ping
    mysql_client -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
                     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
    alive "$RUN/slurmdbd.pid" slurmdbd && return 0
    rm -f "$RUN/slurmdbd.pid"
    slurmdbd 9>&- </dev/null >>"$LOGD/slurmdbd.out" 2>&1 \
        || { log "slurmdbd failed to start:"; tail -n 20 "$LOGD/slurmdbd.log" "$LOGD/slurmdbd.out" >&2 || true; exit 1; }
    wait_for "$WAIT_S" slurmdbd "$LOGD/slurmdbd.log" "$RUN/slurmdbd.pid" slurmdbd timeout 10 sacctmgr -n -P list cluster
    if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
        timeout 20 sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
}

start_slurmctld() {
    alive "$RUN/slurmctld.pid" slurmctld && return 0
    rm -f "$RUN/slurmctld.pid"
    slurmctld 9>&- </dev/null >>"$LOGD/slurmctld.out" 2>&1 \
        || { log "slurmctld failed to start:"; tail -n 20 "$LOGD/slurmctld.log" "$LOGD/slurmctld.out" >&2 || true; exit 1; }
    wait_for "$WAIT_S" slurmctld "$LOGD/slurmctld.log" "$RUN/slurmctld.pid" slurmctld ctld_up
}

start_slurmd() {
    alive "$RUN/slurmd.pid" slurmd && return 0
    rm -f "$RUN/slurmd.pid"
    slurmd 9>&- </dev/null >>"$LOGD/slurmd.out" 2>&1 \
        || { log "slurmd failed to start:"; tail -n 20 "$LOGD/slurmd.log" "$LOGD/slurmd.out" >&2 || true; exit 1; }
    wait_for "$WAIT_S" "slurmd (node $NODE idle)" "$LOGD/slurmd.log" "$RUN/slurmd.pid" slurmd node_idle
}

ctld_up()   { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
# idle, or already running jobs (mixed/allocated): anything but down/drained/unknown
node_idle() { [[ $(timeout 10 sinfo -h -N -o %T 2>/dev/null | head -n1) =~ ^(idle|mixed|allocated|completing)$ ]]; }
sacct_ok()  { timeout 10 sacct -n -X -S now >/dev/null 2>&1; }

cluster_up() {
    [[ -f $SLURM_CONF ]] || return 1
    alive "$RUN/mariadbd.pid" mariadbd && alive "$RUN/slurmdbd.pid" slurmdbd &&
        alive "$RUN/slurmctld.pid" slurmctld && alive "$RUN/slurmd.pid" slurmd &&
        munge_ok && ctld_up && node_idle && sacct_ok
}

# ---------------------------------------------------------------------------------------- commands
cmd_start() {
    if cluster_up; then
        log "already up ($DIR)"
        echo "export SLURM_CONF=$SLURM_CONF"; return 0
    fi
    if [[ $(id -u) != 0 ]]; then
        echo "$PROG: cannot start SLURM daemons: not root" >&2; exit 3
    fi
    install_if_needed
    local t0=$SECONDS
    write_config
    start_munged
    start_mariadbd
    start_slurmdbd
    start_slurmctld
    start_slurmd
    wait_for "$WAIT_S" sacct "$LOGD/slurmdbd.log" - - sacct_ok
    log "up in $((SECONDS - t0))s: partition '$PARTITION', node $NODE, logs in $LOGD"
    echo "export SLURM_CONF=$SLURM_CONF"
}

# processes left by this cluster's jobs: slurmstepd and the job's own, found by SLURM_CONF in environ
job_pids() {
    local p env
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [[ $p == "$$" || $p == "$BASHPID" ]] && continue
        env=$(tr '\0' '\n' 2>/dev/null < "/proc/$p/environ") || continue
        grep -qxF "SLURM_CONF=$SLURM_CONF" <<<"$env" || continue
        if [[ $(cat "/proc/$p/comm" 2>/dev/null) == slurmstepd ]] || grep -q '^SLURM_JOB_ID=' <<<"$env"; then
            echo "$p"
        fi
    done
}

# the run/ dir of another cluster of this script whose SLURM daemons are alive (they share munged)
other_cluster_run() {
    local p conf
    for p in $(pgrep -x 'slurmctld|slurmd|slurmdbd' || true); do
        live_pid "$p" || continue
        conf=$(tr '\0' '\n' 2>/dev/null < "/proc/$p/environ" | sed -n 's/^SLURM_CONF=//p')
        [[ -n $conf && $conf != "$SLURM_CONF" ]] || continue
        echo "$(dirname "$(dirname "$conf")")/run"; return 0
    done
    return 1
}

cmd_stop() {
    if [[ -f $SLURM_CONF ]] && alive "$RUN/slurmctld.pid" slurmctld; then
        local jobs; jobs=$(timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then timeout 10 scancel $jobs 2>/dev/null || true; sleep 1; fi
    fi
    kill_pidfile "$RUN/slurmd.pid" slurmd
    local left; left=$(job_pids)
    if [[ -n $left ]]; then kill -KILL $left 2>/dev/null || true; log "killed leftover job processes:" $left; fi
    kill_pidfile "$RUN/slurmctld.pid" slurmctld
    kill_pidfile "$RUN/slurmdbd.pid" slurmdbd
    kill_pidfile "$RUN/mariadbd.pid" mariadbd
    if [[ -e $RUN/munged.ours ]]; then
        local other
        if other=$(other_cluster_run) && [[ -d $other ]]; then
            # hand munged over: the other cluster's stop will end it
            cp "$RUN/munged.pid" "$other/munged.pid" 2>/dev/null && touch "$other/munged.ours"
            log "leaving munged running for the cluster in ${other%/run}"
        else
            kill_pidfile "$RUN/munged.pid" munged
        fi
    fi
    rm -f "$RUN/munged.ours" "$RUN/munged.pid"
    return 0
}

cmd_status() {
    if cluster_up; then echo "up: $DIR (partition '$PARTITION')"; return 0; fi
    echo "down: $DIR"; return 1
}

# one start/stop at a time per DIR (e.g. two pytest-xdist workers starting the same cluster)
# (the daemons are started with fd 9 closed, so that they do not hold the lock)
lock() { exec 9>"$DIR/.lock"; flock -w 300 9 || die "could not lock $DIR/.lock"; }

[[ $# -eq 2 ]] || usage
case $1 in
    start)  setup_paths "$2"; lock; cmd_start ;;
    stop)   [[ -d $2 ]] || exit 0; setup_paths "$2"; lock; cmd_stop ;;
    status) [[ -d $2 ]] || { echo "down: $2"; exit 1; }; setup_paths "$2"; cmd_status ;;
    *) usage ;;
esac
