#!/usr/bin/env bash
# Makes sure PostgreSQL and RabbitMQ are installed and running on this machine.
# Installs them with apt-get when absent (root only), starts them when stopped, and
# fails with one clear line otherwise. Idempotent: cheap when both are already up.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}

say() { echo "ensure-services: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
    local host=$1 port=$2 what=$3 i
    for i in $(seq 1 60); do
        port_open "$host" "$port" && return 0
        sleep 1
    done
    die "$what did not come up on $host:$port within 60 s"
}

apt_install() {
    [ "$(id -u)" = 0 ] || die "$* missing and not root: install it (apt-get install $*) and rerun"
    command -v apt-get >/dev/null || die "$* missing and no apt-get here: install it by hand"
    say "installing $* with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq "$@" >/dev/null
}

ensure_postgres() {
    if port_open "$PGHOST" "$PGPORT"; then return 0; fi
    if ! command -v pg_ctlcluster >/dev/null; then
        apt_install postgresql
    fi
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || die "PostgreSQL is installed but has no cluster in /etc/postgresql"
    say "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    wait_port "$PGHOST" "$PGPORT" PostgreSQL
    # A fresh Debian cluster only trusts local socket peers: let tests and the service
    # connect over TCP as postgres without a password, as on the development machines.
    local hba="/etc/postgresql/$version/main/pg_hba.conf"
    if [ -w "$hba" ] && ! grep -q 'crm-backend' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust # crm-backend local dev\nhost all all ::1/128 trust # crm-backend local dev' "$hba"
        pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
    fi
}

ensure_rabbitmq() {
    if port_open 127.0.0.1 5672; then return 0; fi
    if ! command -v rabbitmq-server >/dev/null; then
        apt_install rabbitmq-server
    fi
    say "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_port 127.0.0.1 5672 RabbitMQ
}

# PgBouncer (Debian's package) is only run by the tests, beside PostgreSQL, to check the
# Evolution reader through a transaction pooler: installed here, never started.
ensure_pgbouncer() {
    if command -v pgbouncer >/dev/null || [ -x /usr/sbin/pgbouncer ]; then return 0; fi
    apt_install pgbouncer
}

ensure_postgres
ensure_rabbitmq
ensure_pgbouncer
say "PostgreSQL ($PGHOST:$PGPORT) and RabbitMQ (127.0.0.1:5672) are up"
