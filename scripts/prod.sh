#!/usr/bin/env bash
# Run the production stack on one host, without Docker, against PostgreSQL and Redis:
#
#   DATABASE_URL=postgres://user:pass@127.0.0.1:5432/agentplatform REDIS_URL=redis://127.0.0.1:6379/0 \
#   SECRET_KEY=... WORKERS=2 HOST=0.0.0.0 PORT=8000 bash scripts/prod.sh
#
# Migrates (MIGRATE=0 skips it), then runs, as children of this script:
#   * gunicorn with WORKERS uvicorn worker processes on HOST:PORT (HTTP and WebSockets on the
#     one port; agentplatform/gunicorn_conf.py says why this server), default WORKERS = cores;
#   * a Celery worker (CELERY_WORKER=0: none; CELERY_CONCURRENCY: its processes, default cores);
#   * Celery beat (BEAT=0: none. Run exactly one beat per deployment: on one host only);
#   * the audit chain's sequencer, `manage.py audit_sequencer` (AUDIT_SEQUENCER=0: none; one per
#     host is fine, they take turns).
# SIGTERM or SIGINT (Ctrl-C) is forwarded to every child as SIGTERM (gunicorn and Celery finish
# what they are doing, up to 30 s, then are killed); if any child exits on its own, the others
# are stopped and the script exits with that child's status.
#
# PROMETHEUS_MULTIPROC_DIR (default $VAR_DIR/prometheus) is created empty at each start and
# exported: the worker processes write their metrics there and /metrics sums them.
# SECRET_KEY: as scripts/run.sh, from the environment or $VAR_DIR/secret_key (generated once);
# set the same SECRET_KEY on every host of a deployment. DEBUG is forced off.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"
CORES="$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)"
WORKERS="${WORKERS:-$CORES}"
MIGRATE="${MIGRATE:-1}"
CELERY_WORKER="${CELERY_WORKER:-1}"
CELERY_CONCURRENCY="${CELERY_CONCURRENCY:-$CORES}"
BEAT="${BEAT:-1}"
AUDIT_SEQUENCER="${AUDIT_SEQUENCER:-1}"
STOP_TIMEOUT="${STOP_TIMEOUT:-35}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "WORKERS must be a positive integer, not '$WORKERS'."
[[ "$CELERY_CONCURRENCY" =~ ^[1-9][0-9]*$ ]] || die "CELERY_CONCURRENCY must be a positive integer."
[[ -n "${DATABASE_URL:-}" ]] || die "DATABASE_URL is not set: the production stack runs on PostgreSQL (e.g. postgres://postgres@127.0.0.1:5432/agentplatform). For the embedded default, use ./scripts/run.sh."
[[ "${DATABASE_URL%%:*}" == postgres* || "${DATABASE_URL%%:*}" == pgsql ]] \
    || die "DATABASE_URL must be a PostgreSQL URL (postgres://...); several worker processes on SQLite are not the production stack."
[[ -n "${REDIS_URL:-}" ]] || die "REDIS_URL is not set: workers share the cache, rate limits, channel layer and Celery broker through Redis (e.g. redis://127.0.0.1:6379/0)."

# --- Python and the virtualenv -----------------------------------------------------------
# shellcheck source=scripts/_venv.sh
source "$ROOT/scripts/_venv.sh"
ensure_venv base

# --- Environment -----------------------------------------------------------------------
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-agentplatform.settings}"
export DEBUG=false
export PYTHONUNBUFFERED=1
VAR_PATH="${VAR_DIR:-$ROOT/var}"
mkdir -p "$VAR_PATH"
# shellcheck source=scripts/_env.sh
source "$ROOT/scripts/_env.sh"
ensure_secret_key
check_port "$HOST" "$PORT" "bash scripts/prod.sh"

# Metrics files of processes from an earlier run would be summed with this run's: start empty.
export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$VAR_PATH/prometheus}"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
find "$PROMETHEUS_MULTIPROC_DIR" -mindepth 1 -maxdepth 1 -name '*.db' -delete

if [[ "$MIGRATE" == 1 ]]; then
    say "Migrating the database"
    "$VPY" manage.py migrate --noinput -v 0
fi

# --- Children ------------------------------------------------------------------------------
PIDS=()
NAMES=()
start() {
    local name="$1"; shift
    "$@" &
    PIDS+=("$!")
    NAMES+=("$name")
    say "Started $name (pid $!)"
}

STOPPING=0
stop_all() {
    [[ "$STOPPING" == 1 ]] && return 0
    STOPPING=1
    local pid deadline=$((SECONDS + STOP_TIMEOUT))
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            say "pid $pid did not stop within ${STOP_TIMEOUT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    wait 2>/dev/null || true
}
on_signal() {
    say "Received SIG$1: stopping ${NAMES[*]}"
    stop_all
    exit "$2"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT
trap 'on_signal HUP 129' HUP
trap stop_all EXIT

start web "$VENV/bin/gunicorn" -c python:agentplatform.gunicorn_conf --workers "$WORKERS" \
    --bind "$HOST:$PORT" agentplatform.asgi:application
if [[ "$CELERY_WORKER" == 1 ]]; then
    start worker "$VENV/bin/celery" -A agentplatform worker --loglevel INFO --concurrency "$CELERY_CONCURRENCY"
fi
if [[ "$BEAT" == 1 ]]; then
    start beat "$VENV/bin/celery" -A agentplatform beat --loglevel INFO \
        --schedule "$VAR_PATH/celerybeat-schedule" --pidfile "$VAR_PATH/celerybeat.pid"
fi
if [[ "$AUDIT_SEQUENCER" == 1 ]]; then
    start sequencer "$VPY" manage.py audit_sequencer
fi

case "$HOST" in
    0.0.0.0 | "::" | "") SHOW_HOST=127.0.0.1 ;;
    *:*) SHOW_HOST="[$HOST]" ;;
    *) SHOW_HOST="$HOST" ;;
esac
say "Agent Platform (production stack) on http://$SHOW_HOST:$PORT/ : $WORKERS web workers, Celery worker: $CELERY_WORKER, beat: $BEAT, audit sequencer: $AUDIT_SEQUENCER (SIGTERM or Ctrl-C stops all)"

# Wait for the first child to exit (a signal interrupts the wait and runs its trap).
set +e
wait -n "${PIDS[@]}"
rc=$?
set -e
for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then say "${NAMES[$i]} (pid ${PIDS[$i]}) exited with status $rc: stopping the others"; break; fi
done
stop_all
exit $((rc == 0 ? 1 : rc))
