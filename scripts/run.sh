#!/usr/bin/env bash
# Run Agent Platform: the one command after cloning.
#
#   ./scripts/run.sh                 # http://127.0.0.1:8000/
#   HOST=0.0.0.0 PORT=9000 ./scripts/run.sh
#
# Creates .venv (python3 >= 3.11) and installs the project into it (skipped while
# pyproject.toml is unchanged), keeps a generated SECRET_KEY in $VAR_DIR/secret_key (mode
# 0600; default var/secret_key) unless SECRET_KEY is set, migrates, seeds the demo (agents,
# the superuser `admin`, an admin API key: the password and key are printed on the first
# run only), prints where everything is, then execs daphne (Ctrl-C stops it).
#
# DEBUG is off unless you set it. Everything else comes from your environment as it is:
# DATABASE_URL / REDIS_URL switch to PostgreSQL / Redis, VAR_DIR moves the SQLite database
# and the key file, OPENAI_API_KEY enables the openai provider (see .env.example).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

HOST="${HOST:-127.0.0.1}"
PORT="${PORT:-8000}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

# --- Python and the virtualenv -----------------------------------------------------------
# shellcheck source=scripts/_venv.sh
source "$ROOT/scripts/_venv.sh"
ensure_venv base

# --- Environment -----------------------------------------------------------------------
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-agentplatform.settings}"
export DEBUG="${DEBUG:-false}"
export PYTHONUNBUFFERED=1

VAR_PATH="${VAR_DIR:-$ROOT/var}"
# shellcheck source=scripts/_env.sh
source "$ROOT/scripts/_env.sh"
ensure_secret_key
check_port "$HOST" "$PORT" ./scripts/run.sh

# --- Database and demo data ----------------------------------------------------------------
say "Migrating the database"
"$VPY" manage.py migrate --noinput -v 0

say "Seeding the demo (agents, superuser admin, API key)"
SEED_OUT="$("$VPY" manage.py seed_demo --json)"
# seed_demo --json prints one JSON object (its last line); read the fields we show.
SEED_FIELDS="$(printf '%s\n' "$SEED_OUT" | "$VPY" -c '
import json, sys
lines = [l for l in sys.stdin.read().splitlines() if l.strip().startswith("{")]
try:
    data = json.loads(lines[-1])
except (IndexError, ValueError):
    sys.exit(1)
def one(v):
    return "" if v is None else " ".join(v) if isinstance(v, list) else str(v)
for k in ("admin_user", "admin_password", "api_key", "agents"):
    print(one(data.get(k)))
')" || { printf '%s\n' "$SEED_OUT"; die "could not read the output of manage.py seed_demo --json (shown above)."; }
{ read -r ADMIN_USER; read -r ADMIN_PASSWORD; read -r API_KEY; read -r AGENTS; } <<<"$SEED_FIELDS" || true
ADMIN_USER="${ADMIN_USER:-admin}"

# --- Banner ------------------------------------------------------------------------------
case "$HOST" in
    0.0.0.0 | "::" | "") SHOW_HOST=127.0.0.1 ;;
    *:*) SHOW_HOST="[$HOST]" ;;
    *) SHOW_HOST="$HOST" ;;
esac
BASE="http://$SHOW_HOST:$PORT"

# Settings read $VAR_DIR/secret_key when SECRET_KEY is unset, so the commands shown just work.
MANAGE=".venv/bin/python manage.py"
if [[ -n "${VAR_DIR:-}" ]]; then MANAGE="VAR_DIR=$VAR_DIR $MANAGE"; fi

if [[ -n "${DATABASE_URL:-}" ]]; then DB_DESC="DATABASE_URL (${DATABASE_URL%%:*})"; else DB_DESC="SQLite, ${VAR_PATH#"$ROOT"/}/db.sqlite3"; fi
if [[ -n "${REDIS_URL:-}" ]]; then STACK_DESC="Redis (REDIS_URL)"; else STACK_DESC="in-process (no REDIS_URL)"; fi

rule='================================================================================'
{
    echo
    echo "$rule"
    echo "  Agent Platform  ->  $BASE/      (Ctrl-C stops it)"
    echo "$rule"
    echo "  Admin console    $BASE/admin/"
    echo "    user           $ADMIN_USER"
    if [[ -n "$ADMIN_PASSWORD" ]]; then
        echo "    password       $ADMIN_PASSWORD"
        echo "                   ^ shown this once: store it now"
    else
        echo "    password       (printed on the first run; to set a new one:"
        echo "                    $MANAGE changepassword $ADMIN_USER)"
    fi
    echo
    if [[ -n "$API_KEY" ]]; then
        echo "  API key (admin)  $API_KEY"
        echo "                   ^ shown this once: store it now"
    else
        echo "  API key          the demo key was printed on the first run; make a new one with:"
        echo "                   $MANAGE create_api_key --name me --role admin"
    fi
    echo
    echo "  API              $BASE/api/v1/"
    echo "  OpenAI-compatible base URL   $BASE/v1   (model = an agent's name)"
    echo "  API docs         $BASE/api/docs/   (sign in to the admin first)"
    echo "  Health           $BASE/health   $BASE/health/ready"
    if [[ -n "$AGENTS" ]]; then echo "  Demo agents      $AGENTS"; fi
    echo "  Database         $DB_DESC; cache/channels/broker: $STACK_DESC; DEBUG=$DEBUG"
    echo
    echo "  Try it (in another terminal):"
    if [[ -n "$API_KEY" ]]; then echo "    KEY=$API_KEY"; else echo "    KEY=ap_...   # your API key"; fi
    echo "    curl -s $BASE/api/v1/agents/assistant/chat -H \"Authorization: Bearer \$KEY\" -H 'Content-Type: application/json' -d '{\"message\": \"What is 17 * 23?\"}'"
    echo "$rule"
    echo
}

# --- Serve -------------------------------------------------------------------------------
# -v 0: the platform writes its own access lines (agentplatform.access, in LOG_FORMAT); daphne's would repeat them.
exec "$VENV/bin/daphne" -v 0 -b "$HOST" -p "$PORT" agentplatform.asgi:application
