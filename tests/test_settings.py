"""Settings come from the environment: each scenario starts Django in a subprocess with only
the variables it names, and prints the settings that matter as JSON (or runs `manage.py check
--deploy`). The subprocesses run in parallel (Django's start-up is most of their cost). A
sqlite:// DATABASE_URL is also driven under load through a real daphne server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import spawn_daphne, stop_processes, wait_ready

ROOT = Path(__file__).resolve().parent.parent
INSECURE = "insecure-dev-only-secret-key-change-me"
GOOD_SECRET = "a-long-random-secret-for-the-settings-tests-0123456789abcdef"

PRINT_SETTINGS = """
import json
import django
django.setup()
from django.conf import settings as s
db = s.DATABASES["default"]
print(json.dumps({
    "DEBUG": s.DEBUG,
    "SECRET_KEY": s.SECRET_KEY,
    "db": {"ENGINE": db["ENGINE"], "NAME": str(db["NAME"]), "HOST": db.get("HOST", ""),
           "CONN_MAX_AGE": db.get("CONN_MAX_AGE"), "OPTIONS": db.get("OPTIONS", {})},
    "cache": s.CACHES["default"],
    "channel_layer": s.CHANNEL_LAYERS["default"],
    "broker": s.CELERY_BROKER_URL,
    "eager": s.CELERY_TASK_ALWAYS_EAGER,
    "providers": s.LLM_PROVIDERS,
    "max_request_bytes": s.MAX_REQUEST_BYTES,
    "upload_limit": s.DATA_UPLOAD_MAX_MEMORY_SIZE,
    "private_networks": [str(n) for n in s.HTTP_FETCH_ALLOW_PRIVATE_NETWORKS],
    "https": {name: getattr(s, name) for name in (
        "SECURE_SSL_REDIRECT", "SECURE_HSTS_SECONDS", "SECURE_HSTS_INCLUDE_SUBDOMAINS", "SECURE_HSTS_PRELOAD",
        "SESSION_COOKIE_SECURE", "CSRF_COOKIE_SECURE")},
}, default=str))
"""

SCENARIOS: dict[str, dict[str, str]] = {
    "no_secret": {"DEBUG": "0"},
    "insecure_secret": {"DEBUG": "0", "SECRET_KEY": INSECURE},
    "production_secret": {"DEBUG": "false", "SECRET_KEY": GOOD_SECRET},
    # Nothing but DEBUG (plus knobs that do not change the stack).
    "embedded": {"DEBUG": "1", "MAX_REQUEST_BYTES": "2048",
                 "LLM_PROVIDERS": '{"vllm": {"base_url": "http://gpu:8000/v1", "api_key_env": "VLLM_KEY"}}',
                 "VLLM_KEY": "sk-vllm", "HTTP_FETCH_ALLOW_PRIVATE_NETWORKS": "10.1.2.0/24, 127.0.0.1,fd00::/8,"},
    "postgres": {"DEBUG": "1", "DATABASE_URL": "postgres://app:pw@db.example:5432/agents",
                 "DATABASE_POOL_MAX_SIZE": "7"},
    "redis": {"DEBUG": "1", "REDIS_URL": "redis://cache.example:6379/2"},
    # Four slashes: an absolute path (three: relative to the working directory).
    "sqlite_url": {"DEBUG": "1", "DATABASE_URL": "sqlite:////srv/agents/x.db"},
    "sqlite_url_with_options": {"DEBUG": "1", "DATABASE_URL": "sqlite:////srv/agents/x.db?timeout=20"},
    "https_only": {"DEBUG": "1", "SECURE_SSL_REDIRECT": "true", "SECURE_HSTS_SECONDS": "3600"},
    "https_only_but_plain_csrf_cookie": {"DEBUG": "1", "SECURE_SSL_REDIRECT": "true", "CSRF_COOKIE_SECURE": "false"},
    "bad_number": {"DEBUG": "1", "MAX_REQUEST_BYTES": "lots"},
    "negative_hsts": {"DEBUG": "1", "SECURE_HSTS_SECONDS": "-1"},
    "bad_providers_json": {"DEBUG": "1", "LLM_PROVIDERS": "{oops"},
    "providers_redefine_openai": {"DEBUG": "1", "LLM_PROVIDERS": '{"openai": {"base_url": "http://x/v1"}}'},
    "bad_private_networks": {"DEBUG": "1", "HTTP_FETCH_ALLOW_PRIVATE_NETWORKS": "true"},
    "bad_rate_limit_fail_mode": {"DEBUG": "1", "RATE_LIMIT_FAIL_MODE": "sometimes"},
    "zero_redis_timeout": {"DEBUG": "1", "REDIS_TIMEOUT_SECONDS": "0"},
    "bad_shadow_limit": {"DEBUG": "1", "EXPERIMENT_SHADOW_DAILY_LIMIT_USD": "ten dollars"},
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[int, dict | None, str]]:
    """scenario → (exit code, printed settings or None, stderr), all started at once."""
    processes = {}
    for name, variables in SCENARIOS.items():
        # Only what the scenario names, so the CI's own DATABASE_URL / REDIS_URL cannot leak in.
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
               "DJANGO_SETTINGS_MODULE": "agentplatform.settings",
               "VAR_DIR": str(tmp_path_factory.mktemp(f"var-{name}")), **variables}
        processes[name] = subprocess.Popen([sys.executable, "-c", PRINT_SETTINGS], cwd=ROOT, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=60)
        printed = json.loads(out.strip().splitlines()[-1]) if process.returncode == 0 else None
        results[name] = (process.returncode, printed, err)
    return results


def ok(outcomes, name: str) -> dict:
    code, printed, err = outcomes[name]
    assert code == 0, err[-2000:]
    return printed


def refused(outcomes, name: str) -> str:
    code, _, err = outcomes[name]
    assert code != 0
    assert "ImproperlyConfigured" in err or "Error" in err
    return err


def test_it_refuses_to_start_without_a_secret_key_when_debug_is_off(outcomes):
    err = refused(outcomes, "no_secret")
    assert "SECRET_KEY" in err


def test_it_refuses_the_insecure_default_secret_when_debug_is_off(outcomes):
    err = refused(outcomes, "insecure_secret")
    assert "SECRET_KEY" in err and "insecure" in err


def test_it_uses_the_insecure_default_only_with_debug_on(outcomes):
    settings = ok(outcomes, "embedded")
    assert settings["DEBUG"] is True
    assert settings["SECRET_KEY"] == INSECURE


def test_it_starts_in_production_with_a_real_secret(outcomes):
    settings = ok(outcomes, "production_secret")
    assert settings["DEBUG"] is False
    assert settings["SECRET_KEY"] == GOOD_SECRET


def test_it_defaults_to_the_embedded_stack(outcomes):
    settings = ok(outcomes, "embedded")
    assert settings["db"]["ENGINE"] == "django.db.backends.sqlite3"
    assert settings["db"]["NAME"].endswith("db.sqlite3") and "var-embedded" in settings["db"]["NAME"]
    assert settings["cache"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"
    assert settings["channel_layer"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
    assert settings["broker"] == "memory://"
    assert settings["eager"] is True


def test_it_uses_postgresql_with_a_connection_pool_given_a_database_url(outcomes):
    db = ok(outcomes, "postgres")["db"]
    assert db["ENGINE"] == "django.db.backends.postgresql"
    assert db["NAME"] == "agents" and db["HOST"] == "db.example"
    assert db["CONN_MAX_AGE"] == 0  # the pool keeps connections, not Django
    assert db["OPTIONS"]["pool"] == {"min_size": 2, "max_size": 7, "timeout": 10.0}


EMBEDDED_SQLITE_OPTIONS = {
    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000;",
    "transaction_mode": "IMMEDIATE",
}


def test_the_embedded_sqlite_database_is_tuned_for_concurrent_writers(outcomes):
    db = ok(outcomes, "embedded")["db"]
    assert db["OPTIONS"] == EMBEDDED_SQLITE_OPTIONS
    assert db["CONN_MAX_AGE"] is None  # the chat path's database threads keep their connections


def test_a_sqlite_database_url_gets_the_embedded_defaults_options(outcomes):
    db = ok(outcomes, "sqlite_url")["db"]
    assert db["ENGINE"] == "django.db.backends.sqlite3"
    assert db["NAME"] == "/srv/agents/x.db"
    assert db["OPTIONS"] == EMBEDDED_SQLITE_OPTIONS
    assert db["CONN_MAX_AGE"] is None


def test_options_a_sqlite_database_url_names_are_kept(outcomes):
    db = ok(outcomes, "sqlite_url_with_options")["db"]
    assert db["OPTIONS"] == {**EMBEDDED_SQLITE_OPTIONS, "timeout": 20}


def test_it_uses_redis_for_cache_channels_and_celery_given_a_redis_url(outcomes):
    settings = ok(outcomes, "redis")
    url = "redis://cache.example:6379/2"
    # django-redis and channels-redis, each outage-aware (agentplatform.cache, agentplatform.channels).
    assert settings["cache"]["BACKEND"] == "agentplatform.cache.ResilientRedisCache"
    assert settings["cache"]["LOCATION"] == url
    assert settings["cache"]["OPTIONS"]["SOCKET_TIMEOUT"] == 1.0
    assert settings["channel_layer"]["BACKEND"] == "agentplatform.channels.ResilientRedisChannelLayer"
    assert [host["address"] for host in settings["channel_layer"]["CONFIG"]["hosts"]] == [url]
    assert settings["broker"] == url
    assert settings["eager"] is False
    assert settings["db"]["ENGINE"] == "django.db.backends.sqlite3"  # independent of the database


def test_it_fails_at_startup_on_malformed_values(outcomes):
    assert "'lots'" in refused(outcomes, "bad_number")
    assert "LLM_PROVIDERS" in refused(outcomes, "bad_providers_json")
    err = refused(outcomes, "providers_redefine_openai")
    assert "LLM_PROVIDERS" in err and "openai" in err
    assert "HTTP_FETCH_ALLOW_PRIVATE_NETWORKS: 'true' is not a network" in refused(outcomes, "bad_private_networks")
    assert "RATE_LIMIT_FAIL_MODE must be 'open' or 'closed'" in refused(outcomes, "bad_rate_limit_fail_mode")
    assert "REDIS_TIMEOUT_SECONDS" in refused(outcomes, "zero_redis_timeout")
    assert "EXPERIMENT_SHADOW_DAILY_LIMIT_USD must be a decimal number (USD per day)" in refused(outcomes,
                                                                                                "bad_shadow_limit")


def test_it_lets_skills_reach_only_public_addresses_unless_networks_are_listed(outcomes):
    assert ok(outcomes, "production_secret")["private_networks"] == []
    assert ok(outcomes, "embedded")["private_networks"] == ["10.1.2.0/24", "127.0.0.1/32", "fd00::/8"]


def test_it_reads_an_extra_providers_key_from_the_variable_it_names(outcomes):
    providers = ok(outcomes, "embedded")["providers"]
    assert providers["vllm"]["base_url"] == "http://gpu:8000/v1"
    assert providers["vllm"]["api_key"] == "sk-vllm"
    assert providers["anthropic"]["api_key"] == ""  # built in, no key set


def test_it_applies_the_body_limit_to_djangos_upload_limit(outcomes):
    settings = ok(outcomes, "embedded")
    assert settings["max_request_bytes"] == settings["upload_limit"] == 2048


# --- DATABASE_URL=sqlite://: the embedded default's SQLite options, under load ------------------

SQLITE_SETUP = """
import json
from decimal import Decimal
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from agents.models import Agent
from billing.budgets import budget_create
from governance.services import api_key_create
Agent.objects.create(name="echo", model="openai/gpt-4o-mini")
budget_create(scope="global", period="month", limit_usd=Decimal("100"))
_, secret = api_key_create(name="load", role="client")
print(json.dumps({"key": secret}))
"""


@pytest.mark.slow
async def test_a_sqlite_database_url_serves_30_concurrent_budgeted_chats(tmp_path, fake_upstream):
    # Budgets reserve and settle in write transactions: without WAL, a busy timeout and
    # IMMEDIATE transactions, SQLite answers concurrent writers with "database is locked" (500).
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
           "DJANGO_SETTINGS_MODULE": "agentplatform.settings", "DEBUG": "0",
           "SECRET_KEY": secrets.token_urlsafe(50), "VAR_DIR": str(tmp_path / "var"),
           "DATABASE_URL": f"sqlite:///{tmp_path / 'load.db'}", "LOG_LEVEL": "WARNING",
           "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": fake_upstream.base_url}
    setup = subprocess.run([sys.executable, "-c", SQLITE_SETUP], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert setup.returncode == 0, setup.stderr[-3000:]
    key = json.loads(setup.stdout.strip().splitlines()[-1])["key"]
    log_path = tmp_path / "daphne.log"
    process, url = spawn_daphne(env, log_path)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 30)
        limits = httpx.Limits(max_connections=30, max_keepalive_connections=30)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            responses = await asyncio.gather(*(
                client.post(f"{url}/api/v1/agents/echo/chat", json={"message": f"hello {n}"},
                            headers={"Authorization": f"Bearer {key}"})
                for n in range(30)))
    finally:
        stop_processes([process])

    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 30, ([r.text[:300] for r in responses if r.status_code != 200][:3],
                                    log_path.read_text()[-2000:])
    assert (tmp_path / "load.db").is_file()


# --- HTTPS settings and `manage.py check --deploy` ----------------------------------------------


def test_https_settings_are_off_by_default(outcomes):
    assert ok(outcomes, "embedded")["https"] == {
        "SECURE_SSL_REDIRECT": False, "SECURE_HSTS_SECONDS": 0, "SECURE_HSTS_INCLUDE_SUBDOMAINS": False,
        "SECURE_HSTS_PRELOAD": False, "SESSION_COOKIE_SECURE": False, "CSRF_COOKIE_SECURE": False}


def test_the_admins_cookies_follow_the_https_redirect_unless_set_otherwise(outcomes):
    https = ok(outcomes, "https_only")["https"]
    assert https["SECURE_SSL_REDIRECT"] is True and https["SECURE_HSTS_SECONDS"] == 3600
    assert https["SESSION_COOKIE_SECURE"] is True and https["CSRF_COOKIE_SECURE"] is True
    https = ok(outcomes, "https_only_but_plain_csrf_cookie")["https"]
    assert https["SESSION_COOKIE_SECURE"] is True and https["CSRF_COOKIE_SECURE"] is False


def test_it_refuses_a_negative_hsts_duration(outcomes):
    assert "SECURE_HSTS_SECONDS" in refused(outcomes, "negative_hsts")


PRODUCTION = {"DEBUG": "false", "SECRET_KEY": GOOD_SECRET, "ALLOWED_HOSTS": "agents.example.com"}
HTTPS_ONLY = {**PRODUCTION, "SECURE_PROXY_SSL_HEADER": "true", "SECURE_SSL_REDIRECT": "true",
              "SECURE_HSTS_SECONDS": "3600", "SECURE_HSTS_INCLUDE_SUBDOMAINS": "true", "SECURE_HSTS_PRELOAD": "true"}
DEPLOY_SCENARIOS: dict[str, dict[str, str]] = {
    "plain_http": PRODUCTION,
    "https_only": HTTPS_ONLY,
    "hsts_alone": {**PRODUCTION, "SECURE_SSL_REDIRECT": "true", "SECURE_HSTS_SECONDS": "3600"},
    "plain_session_cookie": {**HTTPS_ONLY, "SESSION_COOKIE_SECURE": "false"},
}
# Django's warnings that our middleware subclasses used to raise falsely: "not in your MIDDLEWARE".
MIDDLEWARE_MISSING = {"security.W001", "security.W002", "security.W003"}


@pytest.fixture(scope="module")
def deploy_checks(tmp_path_factory) -> dict[str, tuple[int, set[str], str]]:
    """scenario → (exit code, ids of the messages `manage.py check --deploy` printed, output)."""
    processes = {}
    for name, variables in DEPLOY_SCENARIOS.items():
        env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"),
               "VAR_DIR": str(tmp_path_factory.mktemp(f"deploy-{name}")), **variables}
        processes[name] = subprocess.Popen([sys.executable, "manage.py", "check", "--deploy"], cwd=ROOT, env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = {}
    for name, process in processes.items():
        out, _ = process.communicate(timeout=60)
        results[name] = (process.returncode, set(re.findall(r"\(([a-z_]+\.[WE]\d{3})\)", out)), out)
    return results


def test_check_deploy_is_clean_on_an_https_only_production_setup(deploy_checks):
    code, ids, out = deploy_checks["https_only"]
    assert code == 0, out
    assert ids == set(), out
    assert "no issues" in out


def test_check_deploy_reports_what_a_plain_http_production_setup_lacks(deploy_checks):
    code, ids, out = deploy_checks["plain_http"]
    assert code == 0, out  # warnings, not errors
    # HSTS, the SSL redirect, the session and CSRF cookies: honestly, and no false "missing middleware".
    assert ids == {"security.W004", "security.W008", "security.W012", "security.W016"}, out
    assert not ids & MIDDLEWARE_MISSING


def test_check_deploy_reports_hsts_without_subdomains_or_preload(deploy_checks):
    _, ids, out = deploy_checks["hsts_alone"]
    assert ids == {"security.W005", "security.W021"}, out


def test_check_deploy_reports_a_session_cookie_set_back_to_plain_http(deploy_checks):
    _, ids, out = deploy_checks["plain_session_cookie"]
    assert ids == {"security.W012"}, out


def test_https_only_redirects_pages_and_the_api_but_not_the_health_probe(client, settings, db):
    settings.SECURE_SSL_REDIRECT = True
    settings.SECURE_HSTS_SECONDS = 3600

    page = client.get("/admin/login/")
    api = client.get("/api/v1/agents")
    health = client.get("/health")
    secure = client.get("/admin/login/", secure=True)

    assert (page.status_code, page["Location"]) == (301, "https://testserver/admin/login/")
    assert (api.status_code, api["Location"]) == (301, "https://testserver/api/v1/agents")
    assert health.status_code == 200  # load balancers and the Docker healthcheck probe over plain HTTP
    assert secure.status_code == 200
    assert secure["Strict-Transport-Security"] == "max-age=3600"
