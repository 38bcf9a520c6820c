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
#
# NODES=2 (or more) makes a real multi-node cluster on this one machine: each slurmd runs in a
# network namespace the script makes (`ip netns`, a veth pair into a bridge), with its own
# address, host name (UTS namespace) and /etc/hosts (DIR/etc/hosts bind-mounted inside that
# namespace only; the machine's /etc/hosts is never touched). Nodes are node1..nodeN at
# SUBNET.11.., the controller is at SUBNET.1 on the bridge; SUBNET defaults to
# 10.213.<PORT_BASE/10 % 256> and must lie in 10.213.0.0/16: no other address is ever used.
# Each slurmd has its own spool, pid and log file under DIR (spool/<node>, run/slurmd.<node>.pid,
# log/slurmd.<node>.log); SlurmdTimeout is 10 s so that a node failure is seen quickly.
#
#   NODES=2 bash scripts/slurm_local.sh start DIR    # ... sinfo -N: node1 node2 idle
#   srun -N2 hostname                                # node1, node2
#   bash scripts/slurm_local.sh kill-node DIR node2  # a node failure: SIGKILL every process in its namespace
#   bash scripts/slurm_local.sh start-node DIR node2 # its slurmd again (ReturnToService=2: back to idle)
#   bash scripts/slurm_local.sh stop DIR             # stops the daemons by pid, removes namespaces and bridge
#
# NODES is remembered in DIR, so stop / kill-node / start-node need not repeat it.
set -euo pipefail
cmd=${1:-}
DIR=${2:-}
[ -n "$cmd" ] && [ -n "$DIR" ] || { echo "usage: $0 start|stop|status DIR | kill-node|start-node DIR NODE" >&2; exit 2; }
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
FAKE_CPUS=${FAKE_CPUS:-8}
FAKE_GPUS=${FAKE_GPUS:-4}
if [ "$cmd" != start ] && [ -f "$DIR/run/cluster.env" ]; then
    . "$DIR/run/cluster.env"  # NODES, PORT_BASE and SUBNET of the cluster that start made
fi
NODES=${NODES:-1}
PORT_BASE=${PORT_BASE:-16810}
SUBNET=${SUBNET:-10.213.$((PORT_BASE / 10 % 256))}
CTLD_PORT=$((PORT_BASE + 7)) SLURMD_PORT=$((PORT_BASE + 8)) DBD_PORT=$((PORT_BASE + 9)) DB_PORT=$((PORT_BASE + 6))
NODE=$(hostname -s)
BRIDGE=slbr$PORT_BASE  # the bridge and namespaces carry PORT_BASE, so two clusters can coexist
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

ns_of() { echo "sl${PORT_BASE}$1"; }  # the network namespace of node $1

kill_node() {  # node: SIGKILL every process in its namespace (slurmd, slurmstepd, the tasks)
    local ns pids; ns=$(ns_of "$1")
    ip netns list | grep -qw "$ns" || return 0
    pids=$(ip netns pids "$ns" || true)
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
    for _ in $(seq 50); do [ -z "$(ip netns pids "$ns")" ] && break; sleep 0.1; done
    rm -f "$DIR/run/slurmd.$1.pid"
}

remove_network() {  # the namespaces (with their veth pairs) and the bridge that start recorded in run/netns
    [ -f "$DIR/run/netns" ] || return 0
    local kind name ns pids
    while read -r kind name ns; do
        [ "$kind" = node ] || continue
        stop_pid "slurmd $name" "$DIR/run/slurmd.$name.pid"
        if ip netns list | grep -qw "$ns"; then
            pids=$(ip netns pids "$ns" || true)  # what is left of its jobs
            [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
            ip netns del "$ns" 2>/dev/null || true  # takes its veth pair with it
        fi
    done < "$DIR/run/netns"
    while read -r kind name ns; do
        [ "$kind" = bridge ] && { ip link del "$name" 2>/dev/null || true; }
    done < "$DIR/run/netns"
    rm -f "$DIR/run/netns"
}

stop() {
    remove_network
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
    local ctld_host=localhost spool=$DIR/spool slurmd_pid=$DIR/run/slurmd.pid slurmd_log=$DIR/log/slurmd.log
    local nodes_line="NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$FAKE_CPUS RealMemory=$mem Gres=gpu:$FAKE_GPUS State=UNKNOWN"
    local gres_nodes=$NODE extra=""
    if [ "$NODES" -gt 1 ]; then  # one node per namespace: its own address, name, spool, pid and log
        ctld_host="$NODE($SUBNET.1)" spool=$DIR/spool/%n slurmd_pid=$DIR/run/slurmd.%n.pid slurmd_log=$DIR/log/slurmd.%n.log
        nodes_line=""
        for i in $(seq "$NODES"); do
            nodes_line+="NodeName=node$i NodeHostname=node$i NodeAddr=$SUBNET.$((10 + i)) CPUs=$FAKE_CPUS RealMemory=$mem Gres=gpu:$FAKE_GPUS State=UNKNOWN"$'\n'
        done
        nodes_line=${nodes_line%$'\n'}
        gres_nodes="node[1-$NODES]"
        extra=$'SlurmdTimeout=10\nMessageTimeout=5\n'  # a killed node is noticed in seconds, not minutes
    fi
    cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$ctld_host
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
AuthInfo=socket=$munge_socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$slurmd_pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$slurmd_log
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
${extra}$nodes_line
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$gres_nodes Name=gpu File=$DIR/dev/nvidia[0-$((FAKE_GPUS - 1))]" > "$DIR/etc/gres.conf"
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

make_network() {  # a bridge at SUBNET.1 and, per node, a namespace with a veth into it at SUBNET.1x
    [[ $SUBNET =~ ^10\.213\.([0-9]{1,3})$ ]] && [ "${BASH_REMATCH[1]}" -le 255 ] \
        || die "SUBNET=$SUBNET: it must be 10.213.X (0 <= X <= 255), the script's private range"
    [ "$(id -u)" = 0 ] || die "NODES=$NODES needs root (ip netns)"
    command -v ip >/dev/null || die "NODES=$NODES needs iproute2 (ip)"
    if ip -4 -o addr show | grep -q " $SUBNET\."; then
        die "SUBNET $SUBNET.0/24 is already in use on this machine (ip addr); choose another with SUBNET=10.213.X or PORT_BASE"
    fi
    printf '127.0.0.1 localhost\n%s.1 %s\n' "$SUBNET" "$NODE" > "$DIR/etc/hosts"
    for i in $(seq "$NODES"); do echo "$SUBNET.$((10 + i)) node$i" >> "$DIR/etc/hosts"; done
    echo "bridge $BRIDGE" > "$DIR/run/netns"  # what stop removes
    ip link add "$BRIDGE" type bridge 2>/dev/null || die "cannot make a bridge ($BRIDGE): is this a container without NET_ADMIN?"
    ip addr add "$SUBNET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    local ns
    for i in $(seq "$NODES"); do
        ns=$(ns_of "node$i")
        ip netns add "$ns" || die "cannot make a network namespace (ip netns add $ns)"
        echo "node node$i $ns" >> "$DIR/run/netns"
        ip link add "${ns}h" type veth peer name "${ns}n"
        ip link set "${ns}n" netns "$ns"
        ip link set "${ns}h" master "$BRIDGE"
        ip link set "${ns}h" up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip link set "${ns}n" name eth0
        ip netns exec "$ns" ip addr add "$SUBNET.$((10 + i))/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
    done
}

start_node() {  # node: its slurmd inside its namespace, with its own host name and /etc/hosts
    local name=$1 ns; ns=$(ns_of "$1")
    ip netns list | grep -qw "$ns" || die "no namespace $ns for $name (is the cluster started with NODES>1?)"
    local pid; pid=$(cat "$DIR/run/slurmd.$name.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then return 0; fi  # its slurmd is running already
    mkdir -p "$DIR/spool/$name"
    # nsenter, not `ip netns exec`: that one remounts /sys, and slurmd wants the machine's cgroup fs
    nsenter --net="/run/netns/$ns" unshare --uts --mount --propagation private sh -c \
        "mount --bind '$DIR/etc/hosts' /etc/hosts && hostname '$name' && exec slurmd -f '$SLURM_CONF' -N '$name'"
}

wait_idle() {  # nodes...
    local state node
    for node in "$@"; do
        for _ in $(seq 150); do
            state=$(sinfo -h -n "$node" -o %t 2>/dev/null || true)
            case "$state" in *'*') ;; idle*) break ;; esac  # idle* is idle but not responding
            sleep 0.2
        done
        case "$state" in *'*') die "node $node is '$state' (not responding; see $DIR/log/slurmd*.log)";; idle*) ;; *) die "node $node is '${state:-unknown}', not idle (see $DIR/log/slurmd*.log)";; esac
    done
}

start() {
    install
    stop >/dev/null 2>&1 || true
    write_config
    printf 'NODES=%s\nPORT_BASE=%s\nSUBNET=%s\n' "$NODES" "$PORT_BASE" "$SUBNET" > "$DIR/run/cluster.env"
    [ "$NODES" -le 1 ] || make_network
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
    # controller and node(s)
    slurmctld -f "$SLURM_CONF"
    wait_for slurmctld 30 scontrol ping
    if [ "$NODES" -le 1 ]; then
        slurmd -f "$SLURM_CONF"
        wait_idle "$NODE"
        log "up: node $NODE idle ($FAKE_CPUS CPUs, $FAKE_GPUS fake GPUs); export SLURM_CONF=$SLURM_CONF"
        return
    fi
    local names=()
    for i in $(seq "$NODES"); do names+=("node$i"); start_node "node$i"; done
    wait_idle "${names[@]}"
    log "up: nodes ${names[*]} idle at $SUBNET.11.. ($FAKE_CPUS CPUs, $FAKE_GPUS fake GPUs each); export SLURM_CONF=$SLURM_CONF"
}

node_arg() {
    local name=${1:-}
    [ "$NODES" -gt 1 ] || die "$cmd needs a cluster started with NODES>1"
    [[ $name =~ ^node[0-9]+$ ]] && [ "${name#node}" -ge 1 ] && [ "${name#node}" -le "$NODES" ] \
        || die "$cmd: which node? node1..node$NODES"
    echo "$name"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    kill-node) name=$(node_arg "${3:-}"); kill_node "$name"; log "killed every process of $name" ;;
    start-node) name=$(node_arg "${3:-}"); start_node "$name"; wait_idle "$name"; log "$name idle" ;;
    *) die "unknown command $cmd (start|stop|status|kill-node|start-node)" ;;
esac
