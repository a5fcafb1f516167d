# Sourced by scripts/run.sh and scripts/test.sh: make .venv and install the project into it.
# Expects ROOT (the repository), say and die; sets VENV and VPY. `ensure_venv base|dev`.
# The install is skipped while the stamp says this pyproject.toml (and extra) is installed.

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"

python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; }

ensure_venv() {
    local extras="$1" spec imports
    if [[ "$extras" == dev ]]; then
        spec='.[dev]' imports='import django, daphne, pytest, pytest_django, xdist'
    else
        spec='.' imports='import django, daphne, channels'
    fi
    if [[ ! -x "$VPY" ]]; then
        command -v "$PYTHON" >/dev/null 2>&1 \
            || die "$PYTHON not found. Agent Platform needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)."
        python_ok "$PYTHON" \
            || die "Agent Platform needs Python 3.11 or newer; $PYTHON is $("$PYTHON" -V 2>&1). Install python3.11+ and/or set PYTHON=/path/to/python3.11."
        say "Creating the virtualenv .venv ($("$PYTHON" -V 2>&1))"
        "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)."
    fi
    python_ok "$VPY" || die ".venv has $("$VPY" -V 2>&1); Python 3.11+ is needed. Remove .venv and run again."

    # The stamp holds the hash of pyproject.toml and the extra installed ("base" or "dev";
    # dev includes base).
    local stamp="$VENV/.agentplatform-install-stamp" hash stamp_hash="" stamp_extras=""
    hash="$("$VPY" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' pyproject.toml)"
    if [[ -f "$stamp" ]]; then read -r stamp_hash stamp_extras <"$stamp" || true; fi
    if [[ "$stamp_hash" == "$hash" && ( "$extras" == base || "$stamp_extras" == dev ) ]] \
        && "$VPY" -c "$imports" 2>/dev/null; then
        return 0
    fi
    say "Installing Agent Platform into .venv (pip install -e '$spec'; a minute on the first run)"
    "$VPY" -m pip install -qq --disable-pip-version-check -e "$spec" || die "pip install -e '$spec' failed (see above)."
    echo "$hash $extras" >"$stamp"
}
