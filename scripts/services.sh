# shellcheck shell=bash
# Makes sure the services entwine's tests talk to are up. Sourced by scripts/test.
# Idempotent: finds a running service and leaves it alone; starts a stopped one; installs a
# missing one with apt (Debian). Needs root (or sudo) only to install or start.

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_install() {
    if [ -z "${ENTWINE_APT_UPDATED:-}" ]; then
        as_root apt-get update -qq
        ENTWINE_APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # description, command...
    local what=$1
    shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "error: $what did not come up within 30 s" >&2
    return 1
}

# PostgreSQL on 127.0.0.1:5432, reachable as postgres/postgres (the tests' default URL).
ensure_postgres() {
    if ! command -v pg_isready >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        echo "PostgreSQL is not installed: installing it with apt"
        apt_install postgresql postgresql-client
    fi
    if ! pg_isready -q -h 127.0.0.1 -p 5432; then
        local version
        version=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -type d -printf "%f\n" 2>/dev/null | sort -V | tail -n 1)
        if [ -z "$version" ]; then
            echo "error: PostgreSQL is installed but has no cluster in /etc/postgresql" >&2
            return 1
        fi
        echo "starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        wait_for "PostgreSQL on 127.0.0.1:5432" pg_isready -q -h 127.0.0.1 -p 5432
    fi
    # A fresh Debian cluster asks TCP clients for a password; give postgres the tests' one.
    if ! PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; then
        echo "setting the password of PostgreSQL role postgres for the tests"
        as_root runuser -u postgres -- psql -q -c "ALTER USER postgres PASSWORD 'postgres'"
    fi
    # Leftovers of interrupted runs (each test drops its own database or schema when it ends).
    PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -Atqc \
        "SELECT 'DROP DATABASE IF EXISTS ' || quote_ident(datname) || ' WITH (FORCE);' FROM pg_database WHERE datname LIKE 'entwine\_test\_%'
         UNION ALL SELECT 'DROP SCHEMA IF EXISTS ' || quote_ident(nspname) || ' CASCADE;' FROM pg_namespace WHERE nspname ~ '^t_[0-9a-f]{32}$'" |
        PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -q >/dev/null
}

# Mosquitto on 127.0.0.1:1883, anonymous (the tests' broker).
ensure_mosquitto() {
    if ! command -v mosquitto >/dev/null 2>&1; then
        echo "Mosquitto is not installed: installing it with apt"
        apt_install mosquitto
    fi
    if ! timeout 1 bash -c '</dev/tcp/127.0.0.1/1883' 2>/dev/null; then
        echo "starting Mosquitto"
        as_root install -d -o mosquitto -g mosquitto /run/mosquitto /var/lib/mosquitto /var/log/mosquitto 2>/dev/null || true
        as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
        wait_for "Mosquitto on 127.0.0.1:1883" timeout 1 bash -c '</dev/tcp/127.0.0.1/1883'
    fi
}

# nats-server, for the broker tests that start their own NATS with JetStream (they never use a
# running one).
ensure_nats() {
    if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then
        echo "nats-server is not installed: installing it with apt"
        apt_install nats-server
    fi
}

# Tools the deployment checks and the archive contract test use.
ensure_deploy_tools() {
    local missing=()
    command -v zip >/dev/null 2>&1 || missing+=(zip)
    command -v unzip >/dev/null 2>&1 || missing+=(unzip)
    command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
    command -v objdump >/dev/null 2>&1 || missing+=(binutils)
    # The broker tests make certificates with it.
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} with apt"
        apt_install "${missing[@]}"
    fi
}
