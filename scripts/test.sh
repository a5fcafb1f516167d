#!/usr/bin/env bash
# Install and run the whole test suite: the one command for tests.
#
#   ./scripts/test.sh                 # both lanes
#   ./scripts/test.sh -x -k chat      # extra arguments go to pytest, in every lane
#
# Lane 1, embedded: the default stack (SQLite, in-memory channel layer, local-memory cache,
#   eager Celery), DEBUG=1, on TEST_WORKERS pytest-xdist workers (default 2; 0 = serial).
# Lane 2, production stack: PostgreSQL and Redis, serially, when both answer:
#   TEST_DATABASE_URL (default postgres://postgres@127.0.0.1:5432/agentplatform)
#   TEST_REDIS_URL    (default redis://127.0.0.1:6379/15)
#   If they don't answer the lane is skipped with a loud notice, or fails when
#   REQUIRE_SERVICES=1 (CI).
#
# Every platform variable of agentplatform/settings.py (and provider keys) is cleared for
# the runs, so the suite is hermetic whatever your shell exports. TEST_DATABASE_NAME passes
# through (the production lane's test database name; default test_<name in the URL>).
# JUnit XML and each lane's log go to test-artifacts/ (also exported to tests as
# TEST_ARTIFACTS_DIR). The exit status is non-zero if any lane failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

# --- Python and the virtualenv -----------------------------------------------------------
# shellcheck source=scripts/_venv.sh
source "$ROOT/scripts/_venv.sh"
ensure_venv dev

# --- A hermetic environment ----------------------------------------------------------------
# Every env var settings.py reads, found in the file itself so new settings are covered too.
mapfile -t SETTINGS_VARS < <(grep -oE 'env(\.[a-z_]+)?\(\s*"[A-Z][A-Z0-9_]*"' agentplatform/settings.py \
    | grep -oE '"[A-Z][A-Z0-9_]*"' | tr -d '"' | sort -u)
CLEAR_VARS=()
for v in "${SETTINGS_VARS[@]}" ANTHROPIC_API_KEY DJANGO_SETTINGS_MODULE PYTEST_ADDOPTS; do
    [[ "$v" == TEST_DATABASE_NAME ]] && continue
    CLEAR_VARS+=(-u "$v")
done
export PYTHONUNBUFFERED=1
export TEST_ARTIFACTS_DIR="$ROOT/test-artifacts"
mkdir -p "$TEST_ARTIFACTS_DIR"

# --- Lanes ---------------------------------------------------------------------------------
FAILED=()
SUMMARY=()

# run_lane NAME TITLE VAR=VALUE... -- PYTEST_ARGS...
run_lane() {
    local name="$1" title="$2"; shift 2
    local assigns=()
    while [[ $# -gt 0 && "$1" != "--" ]]; do assigns+=("$1"); shift; done
    shift
    local log="$TEST_ARTIFACTS_DIR/pytest-$name.log" junit="$TEST_ARTIFACTS_DIR/junit-$name.xml"
    echo
    echo "======================================================================"
    echo " Lane: $title"
    echo "======================================================================"
    local started=$SECONDS rc=0
    set +e
    env "${CLEAR_VARS[@]}" DJANGO_SETTINGS_MODULE=agentplatform.settings "${assigns[@]}" \
        "$VENV/bin/pytest" --junitxml="$junit" -o junit_suite_name="$name" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local elapsed=$((SECONDS - started))
    local verdict
    case $rc in
        0) verdict="passed" ;;
        5) verdict="FAILED (no tests were collected)" ;;
        *) verdict="FAILED (pytest exit $rc)" ;;
    esac
    [[ $rc -ne 0 ]] && FAILED+=("$name")
    echo "--- lane $name: $verdict in ${elapsed}s (log: test-artifacts/pytest-$name.log, junit: test-artifacts/junit-$name.xml)"
    SUMMARY+=("$(printf '%-12s %s in %ss' "$name" "$verdict" "$elapsed")")
}

WORKERS="${TEST_WORKERS:-2}"
XDIST_ARGS=()
if [[ "$WORKERS" != "0" ]]; then XDIST_ARGS=(-n "$WORKERS"); fi

run_lane embedded "embedded default (SQLite, in-process layers, DEBUG=1, ${WORKERS} xdist workers)" \
    DEBUG=1 -- -q "${XDIST_ARGS[@]}" "$@"

# The production stack: probe with plain sockets (pg_isready and redis-cli may not exist).
PG_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/agentplatform}"
REDIS_TEST_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379/15}"
PROBE="$("$VPY" - "$PG_URL" "$REDIS_TEST_URL" <<'EOF'
import socket, sys
from urllib.parse import urlsplit
down = []
for url, default_port, what in ((sys.argv[1], 5432, "PostgreSQL"), (sys.argv[2], 6379, "Redis")):
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        down.append(f"{what} at {host}:{port} ({exc.strerror or exc})")
print("; ".join(down))
EOF
)"
if [[ -z "$PROBE" ]]; then
    # A random SECRET_KEY and DEBUG off: the production path of settings.py.
    run_lane production "production stack (PostgreSQL + Redis, DEBUG off)" \
        DATABASE_URL="$PG_URL" REDIS_URL="$REDIS_TEST_URL" \
        SECRET_KEY="test-$("$VPY" -c 'import secrets; print(secrets.token_urlsafe(40))')" -- -q "$@"
else
    echo
    echo "######################################################################"
    echo "#  SKIPPED production-stack lane: PostgreSQL/Redis not reachable at"
    echo "#  $PROBE"
    echo "#  (set TEST_DATABASE_URL / TEST_REDIS_URL, or start the services)"
    echo "######################################################################"
    if [[ "${REQUIRE_SERVICES:-0}" == "1" ]]; then
        FAILED+=("production")
        SUMMARY+=("$(printf '%-12s %s' production "FAILED: REQUIRE_SERVICES=1 but not reachable: $PROBE")")
    else
        SUMMARY+=("$(printf '%-12s %s' production "SKIPPED (not reachable: $PROBE)")")
    fi
fi

echo
echo "======================================================================"
echo " Summary"
for line in "${SUMMARY[@]}"; do echo "   $line"; done
echo "======================================================================"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    echo "TESTS FAILED: ${FAILED[*]}" >&2
    exit 1
fi
echo "All lanes passed."
