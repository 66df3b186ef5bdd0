#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for tests and for trying the sbatch/submitit paths.
#
#   bash slurm/local_cluster.sh up      # install (once), write a private slurm.conf, start daemons
#   bash slurm/local_cluster.sh down    # stop the daemons this script started
#   bash slurm/local_cluster.sh status  # sinfo/squeue against the private config
#   bash slurm/local_cluster.sh env     # prints `export SLURM_CONF=...` for your shell
#
# Needs root (apt-get, munged as user munge). Writes nothing to /etc: the config lives in
# $SSL_PATH_SLURM_DIR (default /tmp/ssl_path_slurm) and clients find it through SLURM_CONF, which the
# tests set from the same default. No systemd, no slurmdbd (so no sacct: submitit reads job state
# as UNKNOWN; use timeouts). Job state is wiped on every `up` (slurmctld -c).
set -euo pipefail

STATE_DIR="${SSL_PATH_SLURM_DIR:-/tmp/ssl_path_slurm}"
CONF="$STATE_DIR/slurm.conf"
PARTITION="${SSL_PATH_SLURM_PARTITION:-debug}"
PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "[local_cluster] $*" >&2; }

install_packages() {
    local missing=0
    for bin in slurmctld slurmd sinfo munged; do
        command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    if [[ $missing == 1 ]]; then
        log "installing ${PACKAGES[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    fi
}

start_munge() {
    # munged refuses to run as root and wants its dirs owned by munge with strict modes.
    if [[ -S /run/munge/munge.socket.2 ]] && munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    chmod 0700 /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
        chown munge:munge /etc/munge/munge.key
        chmod 0400 /etc/munge/munge.key
    fi
    runuser -u munge -- /usr/sbin/munged 2>>"$STATE_DIR/munged.log"
    for _ in $(seq 1 50); do
        if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
            # Remember that we started it, so `down` stops only our own munged.
            cp /run/munge/munged.pid "$STATE_DIR/munged.pid" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
    log "munged did not come up; see $STATE_DIR/munged.log"
    return 1
}

write_conf() {
    local host cpus mem
    host="$(hostname -s)"
    # Node size as slurmd sees it (CPUs, RealMemory), minus a little memory headroom.
    cpus="$(/usr/sbin/slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -1)"
    mem="$(/usr/sbin/slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -1)"
    mem=$((mem > 1024 ? mem - 512 : mem))
    mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log"
    cat >"$CONF" <<EOF
# Written by slurm/local_cluster.sh: a one-node test cluster on localhost.
ClusterName=sslpath
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# Short credential lifetime: a requeued job may start again ~5 s later instead of ~3 min.
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
# Reject impossible requests at submit time instead of pending forever.
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,kill_invalid_depend
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
StateSaveLocation=${STATE_DIR}/state
SlurmdSpoolDir=${STATE_DIR}/spool
SlurmctldPidFile=${STATE_DIR}/slurmctld.pid
SlurmdPidFile=${STATE_DIR}/slurmd.pid
SlurmctldLogFile=${STATE_DIR}/log/slurmctld.log
SlurmdLogFile=${STATE_DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

wait_idle() {
    local host
    host="$(hostname -s)"
    for _ in $(seq 1 120); do
        state="$(SLURM_CONF="$CONF" sinfo -h -n "$host" -o '%T' 2>/dev/null | head -1 || true)"
        if [[ "$state" == idle* || "$state" == mixed* || "$state" == allocated* ]]; then
            log "node $host is $state (SLURM_CONF=$CONF)"
            return 0
        fi
        if [[ "$state" == down* || "$state" == drain* ]]; then
            SLURM_CONF="$CONF" scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        fi
        sleep 0.5
    done
    log "node did not become idle; logs in $STATE_DIR/log"
    tail -n 20 "$STATE_DIR/log/slurmctld.log" "$STATE_DIR/log/slurmd.log" >&2 || true
    return 1
}

stop_pidfile() {
    local file="$1" pid
    [[ -s "$file" ]] || return 0
    pid="$(cat "$file")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

up() {
    install_packages
    down_quiet
    mkdir -p "$STATE_DIR"
    start_munge
    write_conf
    /usr/sbin/slurmctld -c -f "$CONF"
    /usr/sbin/slurmd -f "$CONF"
    wait_idle
    echo "export SLURM_CONF=$CONF"
}

down_quiet() {
    if [[ -f "$CONF" ]]; then
        # Cancel leftover jobs so their processes do not outlive the cluster.
        SLURM_CONF="$CONF" timeout 10 scancel --full --signal=KILL --user="$(id -un)" >/dev/null 2>&1 || true
        SLURM_CONF="$CONF" timeout 10 scancel --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    stop_pidfile "$STATE_DIR/slurmd.pid"
    stop_pidfile "$STATE_DIR/slurmctld.pid"
    stop_pidfile "$STATE_DIR/munged.pid"
}

case "${1:-}" in
    up) up ;;
    down) down_quiet; log "stopped (state kept in $STATE_DIR)" ;;
    status) SLURM_CONF="$CONF" sinfo; SLURM_CONF="$CONF" squeue ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
