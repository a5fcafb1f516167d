# Sourced by scripts/run.sh and scripts/prod.sh (after _venv.sh): the settings both need
# before Django starts. Expects ROOT, VPY, say and die.

# SECRET_KEY from the environment, else from $VAR_DIR/secret_key (made on the first run, mode
# 0600; settings.py reads the same file when SECRET_KEY is unset, so management commands agree).
ensure_secret_key() {
    [[ -n "${SECRET_KEY:-}" ]] && return 0
    local var_path="${VAR_DIR:-$ROOT/var}" file
    file="$var_path/secret_key"
    if [[ ! -s "$file" ]]; then
        mkdir -p "$var_path"
        (
            umask 077
            "$VPY" -c 'import secrets; print(secrets.token_urlsafe(50))' >"$file.tmp"
            mv "$file.tmp" "$file"
        )
        say "Generated a SECRET_KEY into ${file#"$ROOT"/} (keep it: sessions are signed with it)"
    fi
    chmod 600 "$file"
    SECRET_KEY="$(tr -d '\r\n' <"$file")"
    export SECRET_KEY
}

# Fail now, not after the migrations, if HOST:PORT is taken. `check_port HOST PORT COMMAND`.
check_port() {
    "$VPY" - "$1" "$2" "$3" <<'PY' || exit 1
import socket, sys
host, port, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as exc:
        sys.exit(f"\nERROR: cannot listen on {host}:{port} ({exc.strerror}). Is it running already? "
                 f"Pick another port with PORT=8001 {command}")
PY
}
