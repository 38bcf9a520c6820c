#!/usr/bin/env bash
# A real single-node SLURM (with accounting) on localhost, for the launcher's tests and for trying
# `fairseq-sweep ... --cluster slurm` on one machine. Root on Debian 12 (SLURM 22.05), no systemd.
#
#   bash scripts/slurm_local.sh start DIR    # apt-installs what is missing, starts munged, mariadbd,
#                                            # slurmdbd, slurmctld, slurmd; waits for the node to be idle
#   export SLURM_CONF=DIR/etc/slurm.conf     # then sinfo / sbatch / sacct / submitit talk to it
#   bash scripts/slurm_local.sh stop DIR     # stops every daemon by its pid file
#
# Everything lives under DIR (config, state, logs, sockets, pid files, the accounting database).
# The node advertises FAKE_CPUS CPUs (default 8) and FAKE_GPUS GPUs (default 4): the GPUs are
# character devices made with mknod in DIR/dev so that GRES scheduling (--gpus-per-node) works.
# Ports: PORT_BASE (default 16810) .. +9.
set -euo pipefail
cmd=${1:-}
DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
FAKE_CPUS=${FAKE_CPUS:-8}
FAKE_GPUS=${FAKE_GPUS:-4}
PORT_BASE=${PORT_BASE:-16810}
CTLD_PORT=$((PORT_BASE + 7)) SLURMD_PORT=$((PORT_BASE + 8)) DBD_PORT=$((PORT_BASE + 9)) DB_PORT=$((PORT_BASE + 6))
NODE=$(hostname -s)
log() { printf '[slurm_local] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
export SLURM_CONF="$DIR/etc/slurm.conf"

stop_pid() {  # name pidfile
    local pidfile=$2 pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && { log "$1 ($pid) did not stop; killing"; kill -9 "$pid" 2>/dev/null || true; }
    fi
    rm -f "$pidfile"
}

stop() {
    stop_pid slurmd "$DIR/run/slurmd.pid"
    stop_pid slurmctld "$DIR/run/slurmctld.pid"
    stop_pid slurmdbd "$DIR/run/slurmdbd.pid"
    stop_pid mariadbd "$DIR/run/mariadbd.pid"
    stop_pid munged "$DIR/run/munged.pid"
    log "stopped (state kept in $DIR)"
}

install() {
    local need=()
    for pair in munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client slurmdbd:slurmdbd mariadbd:mariadb-server; do
        command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
    done
    [ -e /usr/lib/x86_64-linux-gnu/slurm-wlm/accounting_storage_mysql.so ] || ls /usr/lib/*/slurm-wlm/accounting_storage_mysql.so >/dev/null 2>&1 || need+=(slurm-wlm-mysql-plugin)
    if [ ${#need[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing ${need[*]}; run as root to apt-get install them"
        log "apt-get install ${need[*]}"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

write_config() {
    mkdir -p "$DIR"/{etc,run,log,state,spool,dev,munge,mysql}
    chmod 755 "$DIR" "$DIR/munge"  # munged wants its socket directory world-executable
    local munge_socket="$DIR/munge/munge.socket"
    for i in $(seq 0 $((FAKE_GPUS - 1))); do
        [ -c "$DIR/dev/nvidia$i" ] || mknod "$DIR/dev/nvidia$i" c 195 "$i"
    done
    local mem; mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem * 3 / 4))
    cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$munge_socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SlurmdParameters=config_overrides
SchedulerParameters=bf_interval=1,sched_interval=2
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
JobRequeue=1
GresTypes=gpu
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$munge_socket
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$FAKE_CPUS RealMemory=$mem Gres=gpu:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$NODE Name=gpu File=$DIR/dev/nvidia[0-$((FAKE_GPUS - 1))]" > "$DIR/etc/gres.conf"
    cat > "$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$munge_socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$DIR/etc/slurmdbd.conf"
}

wait_for() {  # description seconds command...
    local what=$1 secs=$2; shift 2
    for _ in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within ${secs}s (logs in $DIR/log)"
}

start() {
    install
    stop >/dev/null 2>&1 || true
    write_config
    rm -rf "$DIR/state"/* "$DIR/spool"/*  # a fresh controller state (job ids restart at 1)
    # munge
    [ -f "$DIR/munge/munge.key" ] || { mungekey -c -k "$DIR/munge/munge.key" 2>/dev/null || dd if=/dev/urandom bs=1 count=1024 of="$DIR/munge/munge.key" status=none; }
    chmod 400 "$DIR/munge/munge.key"
    munged --force --key-file "$DIR/munge/munge.key" --socket "$DIR/munge/munge.socket" \
        --pid-file "$DIR/run/munged.pid" --log-file "$DIR/log/munged.log" --seed-file "$DIR/munge/munged.seed"
    wait_for munged 10 munge -S "$DIR/munge/munge.socket" -n
    # mariadb (accounting storage)
    if [ ! -d "$DIR/mysql/mysql" ]; then
        mariadb-install-db --datadir="$DIR/mysql" --user=root --auth-root-authentication-method=normal >"$DIR/log/mariadb-install.log" 2>&1
    fi
    (mariadbd --datadir="$DIR/mysql" --user=root --socket="$DIR/run/mysql.sock" --port=$DB_PORT --bind-address=127.0.0.1 \
        --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadb.log" </dev/null >/dev/null 2>&1 &)
    wait_for mariadbd 30 mariadb -S "$DIR/run/mysql.sock" -u root -e "select 1"
    mariadb -S "$DIR/run/mysql.sock" -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
    # slurmdbd, then register the cluster
    slurmdbd
    wait_for slurmdbd 30 sacctmgr -n list cluster
    sacctmgr -i add cluster local >/dev/null 2>&1 || true
    # controller and node
    slurmctld -f "$SLURM_CONF"
    wait_for slurmctld 30 scontrol ping
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 150); do
        state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null || true)
        case "$state" in idle*) break ;; esac
        sleep 0.2
    done
    case "$state" in idle*) ;; *) die "node $NODE is '${state:-unknown}', not idle (see $DIR/log/slurmd.log)";; esac
    log "up: node $NODE idle ($FAKE_CPUS CPUs, $FAKE_GPUS fake GPUs); export SLURM_CONF=$SLURM_CONF"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) die "unknown command $cmd (start|stop|status)" ;;
esac
