#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, and relay run against it while a node dies.
#
#   deploy/cluster.sh start           start relay-c1..c3@localhost and cluster them
#   deploy/cluster.sh stop            stop the three nodes and delete their data
#   deploy/cluster.sh status          each node, the cluster, relay's queues and their leaders
#   deploy/cluster.sh run [--seconds N] [--fault stop_app|kill|rolling|partition]
#                         [--victim partitions|archive|outcomes] [--keep]
#                                     start, drive relay through a node failure, a rolling restart
#                                     or a partition (tests/cluster_run.py), stop (unless --keep);
#                                     exit code: the run's
#   deploy/cluster.sh urls            the nodes' AMQP URLs, comma-separated
#   deploy/cluster.sh ctl N ARGS...   rabbitmqctl ARGS on node N (1-3)
#   deploy/cluster.sh queues N ARGS   rabbitmq-queues ARGS on node N
#   deploy/cluster.sh boot N          start node N's VM again after a kill -9 (it rejoins by itself)
#   deploy/cluster.sh cut N           cut node N off: drop its inter-node and client traffic (iptables)
#   deploy/cluster.sh heal            remove the cut: exactly the rules `cut` added
#
# Node i: AMQP 127.0.0.1:568i, management 127.0.0.1:1568i, distribution 2568i, stream replication
# 6i00-6i49, data under $RELAY_CLUSTER_DIR/c<i> (default /tmp/relay-cluster), partition handling
# pause_minority (docs/OPERATIONS.md). Run as root where cgroup v2 is mounted, node i's processes
# live in the cgroup relay-cluster-c<i> from their start: `cut` tells their connections apart by
# it. The nodes run as the calling user with its ~/.erlang.cookie, register with an epmd of their
# own on 127.0.0.1:$RELAY_CLUSTER_EPMD_PORT (4381), and read none of /etc/rabbitmq: a RabbitMQ
# already running here (rabbit@..., 5672, 15672, 25672, epmd 4369) is neither used nor touched. Every wait has a deadline.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"  # apt_install

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${RELAY_CLUSTER_DIR:-/tmp/relay-cluster}"
EPMD_PORT="${RELAY_CLUSTER_EPMD_PORT:-4381}"
NODES=(1 2 3)
HOST=localhost  # short node names: relay-c1@localhost
START_SECONDS=90
COMMAND_SECONDS=120

say() { echo "relay-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

node() { echo "relay-c$1@$HOST"; }
amqp_port() { echo $((5680 + $1)); }
http_port() { echo $((15680 + $1)); }
dist_port() { echo $((25680 + $1)); }
stream_ports() { echo "$((6000 + 100 * $1)):$((6049 + 100 * $1))"; }  # osiris' replication ports
CUT_CHAIN=RELAY-CLUSTER-CUT

cgroup_root() {  # where cgroup v2 is mounted, if this user may make cgroups there; else nothing
    local root
    root=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)
    [ -n "$root" ] && [ -w "$root" ] && echo "$root"
}
cgroup() { echo "relay-cluster-c$1"; }  # node N's cgroup, as a path under the cgroup v2 root

sbin() {  # the RabbitMQ scripts themselves, not the distribution's wrappers that su to rabbitmq
    if [ -n "${RABBITMQ_SBIN:-}" ]; then echo "$RABBITMQ_SBIN"
    elif [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then echo /usr/lib/rabbitmq/bin
    elif command -v rabbitmq-server >/dev/null; then dirname "$(command -v rabbitmq-server)"
    else die "rabbitmq-server is not installed (apt-get install rabbitmq-server)"
    fi
}

# The environment every server and CLI call of node $1 runs with.
node_env() {
    local i=$1 dir="$BASE/c$1"
    export RABBITMQ_CONF_ENV_FILE="$BASE/rabbitmq-env.conf"  # not /etc/rabbitmq's
    export RABBITMQ_NODENAME
    RABBITMQ_NODENAME="$(node "$i")"
    export RABBITMQ_USE_LONGNAME=false
    export RABBITMQ_NODE_PORT
    RABBITMQ_NODE_PORT="$(amqp_port "$i")"
    export RABBITMQ_DIST_PORT
    RABBITMQ_DIST_PORT="$(dist_port "$i")"
    export RABBITMQ_CTL_DIST_PORT_MIN=$((35690 + 10 * i)) RABBITMQ_CTL_DIST_PORT_MAX=$((35699 + 10 * i))
    export RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log"
    export RABBITMQ_PID_FILE="$dir/pid" RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
    export ERL_EPMD_PORT="$EPMD_PORT" ERL_EPMD_ADDRESS=127.0.0.1
}

ctl() {  # ctl N ARGS: rabbitmqctl on node N, with a deadline
    local i=$1; shift
    (node_env "$i"; exec timeout "$COMMAND_SECONDS" "$(sbin)/rabbitmqctl" -n "$(node "$i")" "$@")
}

queues() {  # queues N ARGS: rabbitmq-queues on node N, with a deadline
    local i=$1; shift
    (node_env "$i"; exec timeout "$COMMAND_SECONDS" "$(sbin)/rabbitmq-queues" -n "$(node "$i")" "$@")
}

running() {  # node N's Erlang VM is up and answers
    local pidfile="$BASE/c$1/pid"
    [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null \
        && ctl "$1" -q eval 'ok.' >/dev/null 2>&1
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_node_files() {
    local i=$1 dir="$BASE/c$1"
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:$(amqp_port "$i")
management.tcp.ip = 127.0.0.1
management.tcp.port = $(http_port "$i")
# new quorum queues and streams get their leader on the node leading the fewest
queue_leader_locator = balanced
# a node that sees fewer than half of the cluster stops serving until it sees more again
cluster_partition_handling = pause_minority
CONF
    local ports
    ports=$(stream_ports "$i")
    # each node's stream replication on ports of its own: `cut` drops them by port
    echo "[{osiris, [{port_range, {${ports%:*}, ${ports#*:}}}]}]." >"$dir/advanced.config"
    echo "[rabbitmq_management]." >"$dir/enabled_plugins"
}

launch() {  # launch N: start node N's Erlang VM and the app in the background
    local i=$1
    for port in "$(amqp_port "$i")" "$(http_port "$i")" "$(dist_port "$i")"; do
        port_taken "$port" && die "port $port (for $(node "$i")) is taken: is another cluster up?"
    done
    mkdir -p "$BASE"
    : >"$BASE/rabbitmq-env.conf"
    write_node_files "$i"
    rm -f "$BASE/c$i/pid"
    say "starting $(node "$i") (AMQP 127.0.0.1:$(amqp_port "$i"), logs in $BASE/c$i/log)"
    local root
    root=$(cgroup_root) || true
    (
        node_env "$i"
        if [ -n "$root" ]; then  # the VM and all it starts (and the sockets they open) in node i's
            mkdir -p "$root/$(cgroup "$i")"
            echo "$BASHPID" >"$root/$(cgroup "$i")/cgroup.procs"
        fi
        exec "$(sbin)/rabbitmq-server" -detached
    )
}

await_node() {  # await_node N: until node N's app runs
    local i=$1 deadline=$((SECONDS + START_SECONDS))
    until [ -s "$BASE/c$i/pid" ] && ctl "$i" -q await_startup --timeout 10 >/dev/null 2>&1; do
        [ $SECONDS -lt $deadline ] || die "$(node "$i") did not start within ${START_SECONDS}s: see $BASE/c$i/log"
        sleep 1
    done
}

boot() {  # boot N...: start the nodes not running, wait until all run
    local i started=()
    for i in "$@"; do
        if running "$i"; then say "$(node "$i") is running"; else launch "$i"; started+=("$i"); fi
    done
    for i in "${started[@]}"; do await_node "$i"; done
}

member() {  # member N: node N is a running member of c1's cluster
    ctl 1 -q eval "lists:member('$(node "$1")', rabbit_nodes:all_running())." 2>/dev/null \
        | grep -qx true
}

start() {
    [ -n "$(sbin)" ]
    if [ ! -e "$BASE" ] && port_taken "$EPMD_PORT"; then
        die "port $EPMD_PORT (the cluster's epmd) is taken: set RELAY_CLUSTER_EPMD_PORT"
    fi
    boot "${NODES[@]}"
    for i in 2 3; do
        member "$i" && continue
        say "joining $(node "$i") to $(node 1)"
        ctl "$i" -q stop_app
        ctl "$i" -q join_cluster "$(node 1)"
        ctl "$i" -q start_app
    done
    local deadline=$((SECONDS + START_SECONDS))
    until member 2 && member 3; do
        [ $SECONDS -lt $deadline ] || die "the cluster did not form within ${START_SECONDS}s"
        sleep 1
    done
    say "cluster of $(node 1) $(node 2) $(node 3) running"
    urls
}

# Node N cut off from the others and from its clients, as by a broken network: on loopback, every
# packet to or from its AMQP port; and, told apart by the cgroup of the process that sends it, each
# connection between it and another node (Erlang distribution, stream replication) dropped at
# the side that opened it (ports: the other node's), which leaves a TCP connection dead both ways.
# CLI calls (rabbitmqctl on any node) and the management API still pass. The rules are in a chain
# of their own, jumped to from OUTPUT: `heal` removes exactly those.
cut() {
    local v=$1 p root
    root=$(cgroup_root) || die "cut needs root and cgroup v2 (the nodes' cgroups)"
    [ -d "$root/$(cgroup "$v")" ] || die "$(node "$v") runs in no cgroup of its own: restart the cluster as root"
    apt_install iptables || die "cut needs iptables"
    iptables -N "$CUT_CHAIN" 2>/dev/null || die "a cut is in place already: deploy/cluster.sh heal"
    local rules=(
        "-p tcp --dport $(amqp_port "$v")"
        "-p tcp --sport $(amqp_port "$v")"
    )
    for p in "${NODES[@]}"; do
        [ "$p" = "$v" ] && continue
        rules+=(
            "-m cgroup --path $(cgroup "$v") -p tcp --dport $(dist_port "$p")"
            "-m cgroup --path $(cgroup "$p") -p tcp --dport $(dist_port "$v")"
            "-m cgroup --path $(cgroup "$v") -p tcp --dport $(stream_ports "$p")"
            "-m cgroup --path $(cgroup "$p") -p tcp --dport $(stream_ports "$v")"
        )
    done
    local rule
    for rule in "${rules[@]}"; do
        # shellcheck disable=SC2086  # each rule is words
        iptables -A "$CUT_CHAIN" $rule -j DROP || { heal; die "iptables refused: $rule"; }
    done
    iptables -I OUTPUT -o lo -j "$CUT_CHAIN" || { heal; die "iptables refused the jump"; }
    say "$(node "$v") cut off (iptables chain $CUT_CHAIN, ${#rules[@]} rules)"
}

heal() {
    command -v iptables >/dev/null || return 0
    iptables -n -L "$CUT_CHAIN" >/dev/null 2>&1 || return 0
    while iptables -D OUTPUT -o lo -j "$CUT_CHAIN" 2>/dev/null; do :; done
    iptables -F "$CUT_CHAIN"
    iptables -X "$CUT_CHAIN"
    say "cut healed (chain $CUT_CHAIN removed)"
}

stop() {
    heal
    for i in "${NODES[@]}"; do
        local pidfile="$BASE/c$i/pid"
        [ -s "$pidfile" ] || continue
        local pid
        pid=$(cat "$pidfile")
        kill -0 "$pid" 2>/dev/null || continue
        say "stopping $(node "$i")"
        if ! ctl "$i" -q stop "$pidfile" >/dev/null 2>&1; then
            say "$(node "$i") did not stop: kill -9 $pid"
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    if [ -d "$BASE" ]; then
        local epmd
        epmd="$(dirname "$(command -v erl)")/epmd"
        [ -x "$epmd" ] || epmd=epmd
        ERL_EPMD_PORT="$EPMD_PORT" timeout 10 "$epmd" -port "$EPMD_PORT" -kill >/dev/null 2>&1 || true
        rm -rf "$BASE"
    fi
    local root
    if root=$(cgroup_root); then
        for i in "${NODES[@]}"; do
            [ -d "$root/$(cgroup "$i")" ] && { rmdir "$root/$(cgroup "$i")" 2>/dev/null \
                || say "cgroup $(cgroup "$i") still holds processes: $(cat "$root/$(cgroup "$i")/cgroup.procs")"; }
        done
    fi
    say "stopped; $BASE removed"
}

status() {
    for i in "${NODES[@]}"; do
        if running "$i"; then
            echo "$(node "$i"): running, amqp://127.0.0.1:$(amqp_port "$i")/, http://127.0.0.1:$(http_port "$i")/"
        else
            echo "$(node "$i"): not running"
        fi
    done
    local i
    for i in "${NODES[@]}"; do
        if running "$i"; then
            ctl "$i" -q eval 'io:format("running together: ~w~n", [lists:sort(rabbit_nodes:all_running())]).' | head -1
            ctl "$i" list_queues -q name type leader members online
            return 0
        fi
    done
    return 1
}

urls() {
    local out=() i
    for i in "${NODES[@]}"; do out+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$i")/"); done
    (IFS=,; echo "${out[*]}")
}

run() {
    local keep=false args=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --keep) keep=true ;;
            *) args+=("$1") ;;
        esac
        shift
    done
    local python="${RELAY_VENV:-$ROOT/.venv}/bin/python"
    [ -x "$python" ] || die "no venv at $python: run deploy/test.sh once"
    $keep || trap stop EXIT
    start >/dev/null
    cd "$ROOT"
    "$python" -m tests.cluster_run "${args[@]}"
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    run) run "$@" ;;
    urls) urls ;;
    ctl) [ $# -ge 2 ] || die "usage: $0 ctl N ARGS..."; ctl "$@" ;;
    queues) [ $# -ge 2 ] || die "usage: $0 queues N ARGS..."; queues "$@" ;;
    boot) [ $# -eq 1 ] || die "usage: $0 boot N"; boot "$1" ;;
    cut) [ $# -eq 1 ] || die "usage: $0 cut N"; cut "$1" ;;
    heal) heal ;;
    *) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
