#!/usr/bin/env bash
# A private 3-node RabbitMQ cluster from the machine's rabbitmq-server, beside (never
# touching) the machine's own broker on 5672: own node names, ports, data, logs, config
# and cookie. Used by `make cluster` and the cluster tests (tests/cluster.py).
#
#   scripts/cluster.sh start        fresh cluster: crmt1..3@localhost on AMQP 5681-5683
#   scripts/cluster.sh stop         stop the nodes and remove their data
#   scripts/cluster.sh status       cluster_status as node crmt1 sees it
#   scripts/cluster.sh kill N       kill -9 node N (1-3), as a crashed machine
#   scripts/cluster.sh restart N    start node N again on its data (it rejoins)
#   scripts/cluster.sh ctl N ARGS   rabbitmqctl against node N
#
# Ports: AMQP 5681-5683, Erlang distribution 19301-19303, CLI tools 19311-19330.
set -euo pipefail

BASE=${CRM_CLUSTER_DIR:-/tmp/crm-cluster-$(id -u)}
RMQ=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
COUNT=3

node_name() { echo "crmt$1@localhost"; }

node_env() {
    local n=$1 dir="$BASE/crmt$1"
    export HOME="$BASE"  # the shared Erlang cookie lives in $HOME/.erlang.cookie
    export RABBITMQ_NODENAME
    RABBITMQ_NODENAME=$(node_name "$n")
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT=$((5680 + n))
    export RABBITMQ_DIST_PORT=$((19300 + n))
    export RABBITMQ_MNESIA_BASE="$dir/mnesia"
    export RABBITMQ_LOG_BASE="$dir/log"
    export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
    export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"  # not /etc/rabbitmq's
    export RABBITMQ_PID_FILE="$dir/pid"
    export RABBITMQ_CTL_DIST_PORT_MIN=19311 RABBITMQ_CTL_DIST_PORT_MAX=19330
    export ERL_EPMD_ADDRESS=127.0.0.1
    export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

ctl() {
    local n=$1
    shift
    (node_env "$n" && "$RMQ/rabbitmqctl" -n "$(node_name "$n")" "$@")
}

write_config() {
    local n=$1 dir="$BASE/crmt$1"
    mkdir -p "$dir/mnesia" "$dir/log"
    cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.default = 127.0.0.1:$((5680 + n))
loopback_users = none
disk_free_limit.absolute = 50MB
vm_memory_high_watermark.absolute = 1GB
CONF
    echo '[].' >"$dir/enabled_plugins"
    : >"$dir/rabbitmq-env.conf"
}

start_node() {
    local n=$1 dir="$BASE/crmt$1"
    # The whole subshell detached from our stdout: callers may read it through a pipe.
    (node_env "$n" && exec setsid "$RMQ/rabbitmq-server") >>"$dir/log/console.log" 2>&1 </dev/null &
    ctl "$n" wait --timeout 120 "$dir/pid" >/dev/null
}

cmd_start() {
    cmd_stop >/dev/null 2>&1 || true
    mkdir -p "$BASE"
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr 'a-f' 'A-Z' | head -c 20 >"$BASE/.erlang.cookie"
    chmod 400 "$BASE/.erlang.cookie"
    for n in $(seq 1 $COUNT); do write_config "$n"; done
    for n in $(seq 1 $COUNT); do start_node "$n" & done
    wait
    for n in $(seq 2 $COUNT); do
        ctl "$n" stop_app >/dev/null
        # A join right after boot fails now and then on a busy machine: reset and retry.
        for try in 1 2 3; do
            if ctl "$n" join_cluster "$(node_name 1)" >/dev/null 2>"$BASE/join.err"; then break; fi
            [ "$try" = 3 ] && { cat "$BASE/join.err" >&2; exit 1; }
            sleep 2
            ctl "$n" reset >/dev/null 2>&1 || true
        done
        ctl "$n" start_app >/dev/null
    done
    ctl 1 await_online_nodes $COUNT >/dev/null 2>&1 || true
    echo "cluster up: AMQP_URL=amqp://guest:guest@127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683/"
}

# epmd forgets a node's name once its socket closes; wait for that, so the name can be
# registered again by a restart.
await_gone() {
    for _ in $(seq 1 100); do
        if ! epmd -names 2>/dev/null | grep -q "name crmt$1 "; then return 0; fi
        sleep 0.1
    done
}

cmd_stop() {
    for n in $(seq 1 $COUNT); do
        local pidfile="$BASE/crmt$n/pid"
        if [ -f "$pidfile" ]; then
            ctl "$n" stop >/dev/null 2>&1 || kill -9 "$(cat "$pidfile")" 2>/dev/null || true
            kill -9 "$(cat "$pidfile" 2>/dev/null)" 2>/dev/null || true
        fi
        await_gone "$n"
    done
    rm -rf "$BASE"
}

cmd_kill() {
    kill -9 "$(cat "$BASE/crmt$1/pid")"
    await_gone "$1"
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) ctl 1 cluster_status ;;
kill) cmd_kill "$2" ;;
restart) start_node "$2" ;;
ctl)
    n=$2
    shift 2
    ctl "$n" "$@"
    ;;
*)
    sed -n '2,14p' "$0"
    exit 2
    ;;
esac
