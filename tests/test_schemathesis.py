"""Property-based fuzzing of the whole documented API: schemathesis reads /api/schema/ from a
real Daphne server (DEBUG off) and sends generated requests, valid and invalid, to every
operation. No answer may be a server error, and every answer must match what the schema says
(status codes, content type, body). On the production lane the server runs on the test
PostgreSQL database and Redis, where more inputs can fail (NUL characters, integer columns).

The key-admin operations that can disable, demote or rotate the caller's own key (PATCH, rotate,
revoke) are left out: the fuzzer would lock itself out. Time-bounded: few examples per
operation, a fixed seed (the same cases every run), the whole run well under 90 s."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings as django_settings
from django.db import connection

from conftest import ROOT, spawn_daphne, stop_processes, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

RUN_SECONDS = 90
EXCLUDED = r"^/api/v1/admin/api-keys/\{prefix\}"  # PATCH, /rotate, /revoke of a key: maybe the caller's

SETUP = """
import io, json
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
call_command("seed_demo", stdout=io.StringIO())
out = io.StringIO()
call_command("create_api_key", name="fuzzer", role="admin", json=True, stdout=out)
print(json.dumps({"key": json.loads(out.getvalue().strip().splitlines()[-1])["key"]}))
"""


def _server_env(var_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV",
                        "CORS_ALLOWED_ORIGINS", "OPENAI_API_KEY", "OPENAI_BASE_URL")}
    run_id = uuid.uuid4().hex[:8]
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), LOG_LEVEL="WARNING", DEMO_MODEL="local/demo")
    db = connection.settings_dict
    if connection.vendor == "postgresql":
        # The test database pytest-django made (flushed after this test, which is transactional).
        password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
        env["DATABASE_URL"] = f"postgres://{db['USER']}{password}@{db['HOST']}:{db['PORT'] or 5432}/{db['NAME']}"
    if django_settings.REDIS_URL:
        env.update(REDIS_URL=django_settings.REDIS_URL, CACHE_KEY_PREFIX=f"fuzz-{run_id}",
                   CHANNEL_LAYER_PREFIX=f"fuzz-{run_id}", CELERY_TASK_ALWAYS_EAGER="true")
    return env


@pytest.fixture
def server(tmp_path, transactional_db):
    env = _server_env(tmp_path)
    setup = subprocess.run([sys.executable, "-c", SETUP], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
    assert setup.returncode == 0, setup.stderr
    key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]
    log_path = tmp_path / "daphne.log"
    process, url = spawn_daphne(env, log_path)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 60)
        yield url, key, log_path
    finally:
        stop_processes([process])


def test_no_generated_request_gets_a_server_error_or_an_undocumented_answer(server, tmp_path):
    url, key, log_path = server
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{url}/api/schema/",
        "--header", f"Authorization: Bearer {key}",
        "--checks", "not_a_server_error,content_type_conformance,response_schema_conformance",
        "--exclude-path-regex", EXCLUDED,
        "--max-examples", "10", "--seed", "20261204", "--workers", "2", "--request-timeout", "20",
        "--no-color",
    ]
    started = time.monotonic()
    try:
        run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_SECONDS)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"schemathesis ran over {RUN_SECONDS} s: {(exc.stdout or b'')[-3000:]!r}")
    elapsed = time.monotonic() - started
    failures = run.stdout[run.stdout.find("FAILURES"):][:8000] if "FAILURES" in run.stdout else run.stdout[-4000:]
    server_log = log_path.read_text(errors="replace")
    errors = "\n".join(line for line in server_log.splitlines() if not line.startswith("127.0.0.1:"))
    assert run.returncode == 0, f"{failures}\n{run.stderr[-2000:]}\n--- server errors ---\n{errors[-6000:]}"
    assert "Traceback" not in server_log, errors[-6000:]
    assert " passed" in run.stdout and elapsed < RUN_SECONDS
