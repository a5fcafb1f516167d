"""Settings for Agent Platform.

Every knob is read here, from the environment, through django-environ; nothing else
reads os.environ. Defaults are the embedded mode (SQLite, in-memory channel layer,
local-memory cache, eager Celery) so a fresh clone runs with nothing configured.
Setting DATABASE_URL / REDIS_URL switches to the production stack.
Malformed values fail here, at startup.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from pathlib import Path

import environ
from celery.schedules import crontab as _crontab
from corsheaders.defaults import default_headers as _cors_default_headers
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
if env.bool("READ_DOT_ENV", default=False):
    environ.Env.read_env(BASE_DIR / ".env")

INSECURE_DEFAULT_SECRET = "insecure-dev-only-secret-key-change-me"

DEBUG = env.bool("DEBUG", default=False)
VAR_DIR = Path(env.str("VAR_DIR", default=str(BASE_DIR / "var")))
# Unset SECRET_KEY: the key scripts/run.sh generated into VAR_DIR/secret_key, if there is one.
SECRET_KEY = env.str("SECRET_KEY", default="")
if not SECRET_KEY and (VAR_DIR / "secret_key").is_file():
    SECRET_KEY = (VAR_DIR / "secret_key").read_text().strip()
if not SECRET_KEY or SECRET_KEY == INSECURE_DEFAULT_SECRET:
    if not DEBUG and not env.bool("ALLOW_INSECURE_SECRET_KEY", default=False):
        raise ImproperlyConfigured(
            "SECRET_KEY is missing or is the insecure default. Set SECRET_KEY to a long random "
            "value (python -c 'import secrets; print(secrets.token_urlsafe(50))'), or run with "
            "DEBUG=true for local development."
        )
    SECRET_KEY = SECRET_KEY or INSECURE_DEFAULT_SECRET

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# Cross-origin browser access (django-cors-headers) to /v1/ and /api/: none unless listed.
# Keys, never cookies, authenticate cross-origin calls (no CORS_ALLOW_CREDENTIALS).
CORS_ALLOWED_ORIGINS = env.list("CORS_ALLOWED_ORIGINS", default=[])
for _origin in CORS_ALLOWED_ORIGINS:
    if not re.fullmatch(r"https?://[^/\s?#]+", _origin):
        raise ImproperlyConfigured(f"CORS_ALLOWED_ORIGINS: {_origin!r} is not an origin such as https://app.example.com "
                                   "(scheme and host[:port], no path).")
# Behind a TLS-terminating load balancer set this so request.is_secure() is right.
if env.bool("SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
# Behind a load balancer that sets X-Forwarded-For: take the client address (audit, limits) from it.
TRUST_X_FORWARDED_FOR = env.bool("TRUST_X_FORWARDED_FOR", default=False)
# HTTPS only: plain-HTTP requests are redirected (SecurityMiddleware; behind a TLS-terminating
# proxy set SECURE_PROXY_SSL_HEADER too, or every request looks plain). The health probes are
# exempt: load balancers and the Docker healthcheck call them over plain HTTP.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_REDIRECT_EXEMPT = [r"^health(/|$)"]
# Strict-Transport-Security on HTTPS responses: browsers then refuse plain HTTP to this host for
# this long. Off by default: once sent it cannot be taken back before it expires.
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
if SECURE_HSTS_SECONDS < 0:
    raise ImproperlyConfigured("SECURE_HSTS_SECONDS must be >= 0.")
# The admin's cookies travel over HTTPS only once the site is HTTPS only, unless said otherwise.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=SECURE_SSL_REDIRECT)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=SECURE_SSL_REDIRECT)
SESSION_COOKIE_HTTPONLY = True
# Flash messages live in the session (server side): a new API key shown once in the admin never
# travels in a cookie.
MESSAGE_STORAGE = "django.contrib.messages.storage.session.SessionStorage"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "corsheaders",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "channels",
    "agentplatform",
    "governance",
    "agents",
    "billing",
    "experiments",
]

# Every middleware here is async-capable without a thread hop on the API paths: Django's
# MiddlewareMixin runs each hook through sync_to_async under ASGI, which funnels every API
# request through a thread several times. The wrappers in agentplatform.middleware run the
# cheap hooks inline and skip the page-only ones (sessions, auth, messages, the pages'
# Content-Security-Policy) for API_PATH_PREFIXES, whose callers authenticate with API keys,
# never cookies. Django's deploy checks of these classes run on ours (agentplatform.checks).
MIDDLEWARE = [
    "agentplatform.middleware.PrometheusBeforeMiddleware",
    "agentplatform.middleware.RequestIdMiddleware",
    "agentplatform.middleware.UrlTextMiddleware",
    # Before anything that can refuse: a preflight is answered without a key.
    "corsheaders.middleware.CorsMiddleware",
    "agentplatform.middleware.SecurityMiddleware",
    "agentplatform.middleware.SessionMiddleware",
    "agentplatform.middleware.CommonMiddleware",
    # A view hook before CSRF's: OPTIONS and methods a view does not answer never reach CSRF.
    "agentplatform.middleware.HttpMethodsMiddleware",
    "agentplatform.middleware.CsrfViewMiddleware",
    "agentplatform.middleware.AuthenticationMiddleware",
    "agentplatform.middleware.MessageMiddleware",
    "agentplatform.middleware.XFrameOptionsMiddleware",
    "agentplatform.middleware.ContentSecurityPolicyMiddleware",
    "agentplatform.middleware.PrometheusAfterMiddleware",
    "agentplatform.middleware.ApiErrorMiddleware",
]
API_PATH_PREFIXES = ("/api/", "/v1/", "/health", "/metrics")
CORS_URLS_REGEX = r"^/(api|v1)/"
CORS_ALLOW_HEADERS = (*_cors_default_headers, "idempotency-key", "x-request-id")
# What a browser app may read: rate limits (governance.ratelimit), the request id, replays, the
# experiment variant that answered (experiments.stages).
CORS_EXPOSE_HEADERS = (
    "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset",
    "X-RateLimit-Limit-Tokens", "X-RateLimit-Remaining-Tokens", "X-RateLimit-Reset-Tokens",
    "X-Request-ID", "Retry-After", "Idempotent-Replayed", "X-Agent-Variant",
)
# Under /api/ but read by staff in a browser: these keep sessions (the docs page, its schema).
API_PATHS_WITH_SESSION = ("/api/docs", "/api/schema")

ROOT_URLCONF = "agentplatform.urls"
ASGI_APPLICATION = "agentplatform.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------
# Unset: SQLite in var/. Set: PostgreSQL via psycopg 3 with its connection pool, or SQLite at
# the URL's path. Under ASGI every request runs its sync ORM work in a thread of its own, so
# Django's CONN_MAX_AGE would strand a connection per thread; the pool keeps connections
# persistent across requests instead.
DATABASE_URL = env.str("DATABASE_URL", default="")


def _sqlite_options(database: dict) -> dict:
    """The options every SQLite database gets, the embedded default's or a sqlite:// URL's.

    WAL, so readers never wait for the writer; a busy timeout, so a writer waits for the lock
    instead of failing; IMMEDIATE transactions, so a transaction takes the write lock when it
    begins (a deferred one that reads, then writes, fails at once with "database is locked"
    when another writer holds it: busy_timeout cannot help there); persistent connections, kept
    by the chat path's database threads (agentplatform.db). Options the URL names win.
    """
    options = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=10000;",
        "transaction_mode": "IMMEDIATE",
        **database.get("OPTIONS", {}),
    }
    return {**database, "CONN_MAX_AGE": None, "OPTIONS": options}


if DATABASE_URL:
    DATABASES = {"default": env.db_url_config(DATABASE_URL)}
    if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        DATABASES["default"]["CONN_MAX_AGE"] = 0
        DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
            "min_size": env.int("DATABASE_POOL_MIN_SIZE", default=2),
            "max_size": env.int("DATABASE_POOL_MAX_SIZE", default=20),
            "timeout": env.float("DATABASE_POOL_TIMEOUT", default=10.0),
        }
else:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": VAR_DIR / "db.sqlite3"}}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"] = _sqlite_options(DATABASES["default"])
# Tests on SQLite use a file, not Django's shared in-memory database: that one refuses
# concurrent writers (table locks, no busy timeout) where the chat path's database threads write
# concurrently by design, as they do on the file database in production.
_test_name = env.str("TEST_DATABASE_NAME", default="")
if not _test_name and DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    _test_name = str(VAR_DIR / "test.sqlite3")
DATABASES["default"]["TEST"] = {"NAME": _test_name or None}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# Threads that run the chat path's ORM work (agentplatform.db), each with its own connection.
DB_THREADS = env.int("DB_THREADS", default=4)

# --- Redis: cache, channel layer, Celery broker -------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
CACHE_URL = env.str("CACHE_URL", default=REDIS_URL)
# Redis outages degrade, they do not break (agentplatform.cache): connect/read timeout of every
# Redis call on the request path, and how long a process skips Redis after a failure.
REDIS_TIMEOUT_SECONDS = env.float("REDIS_TIMEOUT_SECONDS", default=1.0)
REDIS_RETRY_SECONDS = env.float("REDIS_RETRY_SECONDS", default=5.0)
if REDIS_TIMEOUT_SECONDS <= 0 or REDIS_RETRY_SECONDS <= 0:
    raise ImproperlyConfigured("REDIS_TIMEOUT_SECONDS and REDIS_RETRY_SECONDS must be > 0.")
if CACHE_URL:
    CACHES = {
        "default": {
            # django-redis, outage-aware: a failed read is a miss, a failed write is skipped.
            "BACKEND": "agentplatform.cache.ResilientRedisCache",
            "LOCATION": CACHE_URL,
            "KEY_PREFIX": env.str("CACHE_KEY_PREFIX", default="ap"),
            "OPTIONS": {
                "CLIENT_CLASS": "agentplatform.cache.ResilientClient",
                "SOCKET_CONNECT_TIMEOUT": REDIS_TIMEOUT_SECONDS,
                "SOCKET_TIMEOUT": REDIS_TIMEOUT_SECONDS,
            },
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "agentplatform"}}

if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # channels-redis, outage-aware (agentplatform.channels): a consumer outlives Redis.
            "BACKEND": "agentplatform.channels.ResilientRedisChannelLayer",
            # redis-py 8 reads with a 5 s socket timeout by default, which fires during the layer's
            # own 5 s blocking pop (BZPOPMIN) and kills every consumer (channels_redis#422): the
            # read timeout must outlast the pop.
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": 15,
                                  "socket_connect_timeout": REDIS_TIMEOUT_SECONDS}],
                       "prefix": env.str("CHANNEL_LAYER_PREFIX", default="ap")},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL or "memory://")
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default="") or None
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=CELERY_BROKER_URL == "memory://")
CELERY_TASK_EAGER_PROPAGATES = True
# The queue tasks are sent to and workers consume (deployments sharing one broker use their own).
CELERY_TASK_DEFAULT_QUEUE = env.str("CELERY_TASK_DEFAULT_QUEUE", default="celery")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Redis (and SQS) brokers hand a task that a worker took but never acknowledged (the worker was
# killed) to another worker this many seconds after it was delivered: async runs are redelivered
# this way (agents.runs; the sweeper queues them again sooner, once their lease runs out). Keep it
# above the longest run: a task still running then is delivered twice (the second finds it
# running and leaves it alone).
CELERY_BROKER_VISIBILITY_TIMEOUT = env.int("CELERY_BROKER_VISIBILITY_TIMEOUT", default=3600)
if CELERY_BROKER_VISIBILITY_TIMEOUT <= 0:
    raise ImproperlyConfigured("CELERY_BROKER_VISIBILITY_TIMEOUT must be > 0.")
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": CELERY_BROKER_VISIBILITY_TIMEOUT}
CELERY_BEAT_SCHEDULE: dict = {
    "purge-idempotency-records": {"task": "governance.tasks.idempotency_records_purge_task", "schedule": 3600.0},
    # The audit chain's backstop: entries no `manage.py audit_sequencer` chained (none running).
    "sequence-audit-chain": {"task": "governance.tasks.audit_chain_sequence_task", "schedule": 60.0},
    # Budget alerts a settlement did not fire (limits lowered, thresholds changed, lost enqueues).
    "check-budget-alerts": {"task": "billing.tasks.check_budget_alerts_task", "schedule": 60.0},
    # The new period's BudgetSpend rows; reservations stuck in past periods (crashed workers).
    "budget-period-rollover": {"task": "billing.tasks.budget_period_rollover_task",
                               "schedule": _crontab(minute=0)},
    # Daily usage rollups: hourly at :05, so yesterday is final shortly after 00:00 UTC and today
    # is never more than an hour behind.
    "rollup-usage": {"task": "billing.tasks.rollup_usage_task", "schedule": _crontab(minute=5)},
    # Runs whose worker died (lease ran out): ended as interrupted, reservations settled.
    "sweep-interrupted-runs": {"task": "agents.tasks.sweep_interrupted_runs_task",
                               "schedule": float(env.int("RUN_SWEEP_SECONDS", default=30))},
    # Async runs and callbacks whose enqueue was lost (broker down, process gone): enqueued again.
    "requeue-lost-runs": {"task": "agents.tasks.requeue_lost_runs_task", "schedule": 60.0},
    # Canary rollouts whose step is due: advanced, or rolled back (experiments.canary).
    "advance-canaries": {"task": "experiments.tasks.canary_advance_task",
                         "schedule": float(env.int("EXPERIMENT_CANARY_CHECK_SECONDS", default=60))},
}
# Run the beat schedule inside each ASGI process (agentplatform.scheduler): the embedded default,
# where no Celery beat runs. Off by default once a broker is configured (run `celery beat`).
INPROCESS_BEAT = env.bool("INPROCESS_BEAT", default=CELERY_TASK_ALWAYS_EAGER)
# Each ASGI process and Celery worker sweeps interrupted runs once when it starts.
RUN_SWEEP_ON_START = env.bool("RUN_SWEEP_ON_START", default=True)

# --- Static files and templates ---------------------------------------------------------
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Serve /static/ from the ASGI app itself (Django's ASGIStaticFilesHandler). Fine for the
# embedded default and small deployments; behind a CDN or nginx set SERVE_STATIC=false.
SERVE_STATIC = env.bool("SERVE_STATIC", default=True)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Request limits ----------------------------------------------------------------------
# Bodies larger than this are refused with 413 before any JSON is parsed.
MAX_REQUEST_BYTES = env.int("MAX_REQUEST_BYTES", default=1_048_576)
DATA_UPLOAD_MAX_MEMORY_SIZE = MAX_REQUEST_BYTES
MAX_MESSAGE_CHARS = env.int("MAX_MESSAGE_CHARS", default=100_000)
MAX_MESSAGES_PER_REQUEST = env.int("MAX_MESSAGES_PER_REQUEST", default=200)

# --- Agents and providers -------------------------------------------------------------
OPENAI_API_KEY = env.str("OPENAI_API_KEY", default="")
OPENAI_BASE_URL = env.str("OPENAI_BASE_URL", default="") or None


def _llm_providers() -> dict[str, dict]:
    """Extra OpenAI-compatible providers: name -> base URL and the NAME of the env var with its key.

    LLM_PROVIDERS is JSON: {"anthropic": {"base_url": "...", "api_key_env": "ANTHROPIC_API_KEY"}}.
    The key itself is read here, from the environment, and never stored in the database.
    """
    providers = {
        "anthropic": {"base_url": "https://api.anthropic.com/v1/", "api_key_env": "ANTHROPIC_API_KEY"},
    }
    raw = env.str("LLM_PROVIDERS", default="")
    if raw:
        try:
            extra = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ImproperlyConfigured(f"LLM_PROVIDERS is not valid JSON: {exc}") from exc
        if not isinstance(extra, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("base_url"), str) for v in extra.values()
        ):
            raise ImproperlyConfigured('LLM_PROVIDERS must map names to {"base_url": ..., "api_key_env": ...}')
        providers.update(extra)
    for name, conf in providers.items():
        if name in ("openai", "local"):
            raise ImproperlyConfigured(f"LLM_PROVIDERS may not redefine the built-in provider {name!r}")
        key_env = conf.get("api_key_env") or ""
        conf["api_key"] = env.str(key_env, default="") if key_env else ""
    return providers


LLM_PROVIDERS = _llm_providers()
# Upper bound on model round trips in one run (each tool-call step is one).
AGENT_MAX_STEPS = env.int("AGENT_MAX_STEPS", default=8)
# How many earlier messages of a session are sent to the model.
AGENT_HISTORY_LIMIT = env.int("AGENT_HISTORY_LIMIT", default=50)
# How long resolved agents and API keys stay in the shared cache (saves invalidate at once).
AGENT_CACHE_SECONDS = env.int("AGENT_CACHE_SECONDS", default=300)
SSE_HEARTBEAT_SECONDS = env.float("SSE_HEARTBEAT_SECONDS", default=15.0)
# Resilience of model calls (agents.resilience, agentplatform.circuit; README "Resilience"). The
# agent's timeout_seconds bounds its whole run; these shape what happens inside it.
# Retries of a failed call on the same model (an agent's max_retries overrides it), the
# backoff's base, and the longest single wait (a longer Retry-After is not waited out).
LLM_MAX_RETRIES = env.int("LLM_MAX_RETRIES", default=2)
LLM_RETRY_BASE_SECONDS = env.float("LLM_RETRY_BASE_SECONDS", default=0.5)
LLM_RETRY_MAX_WAIT_SECONDS = env.float("LLM_RETRY_MAX_WAIT_SECONDS", default=10.0)
# A stream must send its first token, and then each next part, within these (0: no limit).
LLM_FIRST_TOKEN_TIMEOUT_SECONDS = env.float("LLM_FIRST_TOKEN_TIMEOUT_SECONDS", default=30.0)
LLM_STREAM_IDLE_TIMEOUT_SECONDS = env.float("LLM_STREAM_IDLE_TIMEOUT_SECONDS", default=30.0)
# A provider/model's circuit opens after this many failures in a row (0: no circuit breakers),
# the first at most CIRCUIT_WINDOW_SECONDS ago, and lets a probe through after the cool-down.
CIRCUIT_FAILURE_THRESHOLD = env.int("CIRCUIT_FAILURE_THRESHOLD", default=5)
CIRCUIT_WINDOW_SECONDS = env.float("CIRCUIT_WINDOW_SECONDS", default=60.0)
CIRCUIT_COOLDOWN_SECONDS = env.float("CIRCUIT_COOLDOWN_SECONDS", default=30.0)
if min(LLM_MAX_RETRIES, LLM_RETRY_BASE_SECONDS, LLM_RETRY_MAX_WAIT_SECONDS, LLM_FIRST_TOKEN_TIMEOUT_SECONDS,
       LLM_STREAM_IDLE_TIMEOUT_SECONDS, CIRCUIT_FAILURE_THRESHOLD) < 0 \
        or CIRCUIT_WINDOW_SECONDS <= 0 or CIRCUIT_COOLDOWN_SECONDS <= 0:
    raise ImproperlyConfigured("LLM_MAX_RETRIES, LLM_RETRY_*, LLM_*_TIMEOUT_SECONDS and CIRCUIT_FAILURE_THRESHOLD "
                               "must be >= 0, CIRCUIT_WINDOW_SECONDS and CIRCUIT_COOLDOWN_SECONDS > 0.")
# Crash safety (agents.recovery): a running run's worker renews its lease every
# RUN_CHECKPOINT_SECONDS (checkpointing what it produced); a run whose lease is RUN_LEASE_SECONDS
# old is ended by the sweeper as interrupted.
RUN_LEASE_SECONDS = env.int("RUN_LEASE_SECONDS", default=60)
RUN_CHECKPOINT_SECONDS = env.float("RUN_CHECKPOINT_SECONDS", default=5.0)
if RUN_CHECKPOINT_SECONDS <= 0 or RUN_LEASE_SECONDS < 3 * RUN_CHECKPOINT_SECONDS:
    raise ImproperlyConfigured("RUN_CHECKPOINT_SECONDS must be > 0 and RUN_LEASE_SECONDS at least 3 times it "
                               "(a lease survives two missed renewals).")
if env.int("RUN_SWEEP_SECONDS", default=30) <= 0:
    raise ImproperlyConfigured("RUN_SWEEP_SECONDS must be > 0.")
# Async runs (agents.runs): a run whose worker died is started again up to this many times in
# all (then it ends interrupted, a dead letter); a running one reads its row this often for a
# cancel request; a queued run no worker started (or a callback never tried) this long after its
# enqueue is enqueued again.
RUN_MAX_ATTEMPTS = env.int("RUN_MAX_ATTEMPTS", default=3)
RUN_CANCEL_POLL_SECONDS = env.float("RUN_CANCEL_POLL_SECONDS", default=1.0)
RUN_REQUEUE_AFTER_SECONDS = env.int("RUN_REQUEUE_AFTER_SECONDS", default=600)
# The callback POSTed when an async run ends: signed like budget alerts (X-AgentPlatform-Signature)
# with this secret (default: BUDGET_ALERT_WEBHOOK_SECRET's), tried 1 + RUN_CALLBACK_MAX_RETRIES
# times with exponential backoff (30 s, 60 s, ... at most an hour), then a dead letter.
RUN_CALLBACK_SECRET = (env.str("RUN_CALLBACK_SECRET", default="")
                       or env.str("BUDGET_ALERT_WEBHOOK_SECRET", default=""))
RUN_CALLBACK_TIMEOUT = env.float("RUN_CALLBACK_TIMEOUT", default=10.0)
RUN_CALLBACK_MAX_RETRIES = env.int("RUN_CALLBACK_MAX_RETRIES", default=5)
RUN_CALLBACK_RETRY_BACKOFF_SECONDS = env.float("RUN_CALLBACK_RETRY_BACKOFF_SECONDS", default=30.0)
if RUN_MAX_ATTEMPTS < 1 or RUN_CANCEL_POLL_SECONDS <= 0 or RUN_REQUEUE_AFTER_SECONDS <= 0 \
        or RUN_CALLBACK_TIMEOUT <= 0 or RUN_CALLBACK_MAX_RETRIES < 0 or RUN_CALLBACK_RETRY_BACKOFF_SECONDS < 0:
    raise ImproperlyConfigured("RUN_MAX_ATTEMPTS must be >= 1, RUN_CANCEL_POLL_SECONDS, RUN_REQUEUE_AFTER_SECONDS "
                               "and RUN_CALLBACK_TIMEOUT > 0, RUN_CALLBACK_MAX_RETRIES and "
                               "RUN_CALLBACK_RETRY_BACKOFF_SECONDS >= 0.")
# WebSocket chat (agents.consumers). Larger client frames get an error frame `frame_too_large`
# (daphne itself closes with 1009 above its --websocket-max-message-size, 1 MiB by default).
WS_MAX_FRAME_BYTES = env.int("WS_MAX_FRAME_BYTES", default=524_288)
# A connection with neither a key on the handshake nor a staff session must send its
# {"type": "auth"} frame within this time, or it is closed with 4401.
WS_AUTH_TIMEOUT_SECONDS = env.float("WS_AUTH_TIMEOUT_SECONDS", default=10.0)
# Close (4408) a connection after this long without a client frame or a running turn; 0: never
# (daphne's keepalive pings, --ping-interval/--ping-timeout, still drop dead peers).
WS_IDLE_TIMEOUT_SECONDS = env.float("WS_IDLE_TIMEOUT_SECONDS", default=0.0)
if WS_MAX_FRAME_BYTES < 1 or WS_AUTH_TIMEOUT_SECONDS <= 0 or WS_IDLE_TIMEOUT_SECONDS < 0:
    raise ImproperlyConfigured("WS_MAX_FRAME_BYTES and WS_AUTH_TIMEOUT_SECONDS must be > 0, "
                               "WS_IDLE_TIMEOUT_SECONDS >= 0.")


def _private_networks() -> tuple:
    """HTTP_FETCH_ALLOW_PRIVATE_NETWORKS: networks skills may reach although they are not public.

    Comma-separated CIDRs ("10.0.0.0/8,127.0.0.1"; a bare address is one host; "0.0.0.0/0,::/0"
    exempts everything). Empty: http_fetch and http skills reach public addresses only
    (agents/skills/outbound.py).
    """
    networks = []
    for raw in env.list("HTTP_FETCH_ALLOW_PRIVATE_NETWORKS", default=[]):
        if not raw.strip():
            continue
        try:
            networks.append(ipaddress.ip_network(raw.strip(), strict=False))
        except ValueError:
            raise ImproperlyConfigured(f"HTTP_FETCH_ALLOW_PRIVATE_NETWORKS: {raw!r} is not a network such as "
                                       "10.0.0.0/8 or 127.0.0.1 (comma-separated).") from None
    return tuple(networks)


HTTP_FETCH_ALLOW_PRIVATE_NETWORKS = _private_networks()

# The demo agents use the offline `local` model unless an OpenAI key is configured.
DEMO_MODEL = env.str("DEMO_MODEL", default="openai/gpt-4o-mini" if OPENAI_API_KEY else "local/demo")

# /metrics: served to callers presenting this bearer token, or an admin-role API key.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# Several processes on a host (daphne workers, Celery workers): a directory they all share for
# prometheus_client's multiprocess mode, emptied when the deployment starts (agentplatform.metrics).
# prometheus_client reads the variable itself when imported; here it is checked.
PROMETHEUS_MULTIPROC_DIR = env.str("PROMETHEUS_MULTIPROC_DIR", default="")
if PROMETHEUS_MULTIPROC_DIR and not (os.path.isdir(PROMETHEUS_MULTIPROC_DIR)
                                     and os.access(PROMETHEUS_MULTIPROC_DIR, os.W_OK)):
    raise ImproperlyConfigured(f"PROMETHEUS_MULTIPROC_DIR={PROMETHEUS_MULTIPROC_DIR!r} is not a writable directory: "
                               "create it (empty) before the processes start.")
# A private port that serves the metrics without credentials (every web and worker process opens
# it, SO_REUSEPORT; never publish it). 0: metrics only on /metrics, behind METRICS_TOKEN.
METRICS_PORT = env.int("METRICS_PORT", default=0)
if not 0 <= METRICS_PORT <= 65535:
    raise ImproperlyConfigured("METRICS_PORT must be a port number (0: none).")
# django-prometheus' migration gauges: off (one series per process in multiprocess mode).
PROMETHEUS_EXPORT_MIGRATIONS = False

# OpenTelemetry traces (agentplatform.tracing), exported over OTLP/HTTP when an endpoint is set.
# The SDK reads its other standard variables itself (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT,
# OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES, ...).
OTEL_EXPORTER_OTLP_ENDPOINT = env.str("OTEL_EXPORTER_OTLP_ENDPOINT", default="")
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT = env.str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", default="")
OTEL_SERVICE_NAME = env.str("OTEL_SERVICE_NAME", default="agent-platform")
OTEL_TRACES_ENABLED = bool(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) \
    and not env.bool("OTEL_SDK_DISABLED", default=False)

# --- REST framework and OpenAPI --------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["governance.authentication.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["governance.permissions.HasApiKey"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    # agentplatform.jsonparse's rules: NaN, Infinity, 1e999, lone surrogates, deep nesting → 400.
    "DEFAULT_PARSER_CLASSES": ["agentplatform.parsers.StrictJSONParser"],
    "DEFAULT_PAGINATION_CLASS": "agentplatform.pagination.Pagination",
    "PAGE_SIZE": 50,
    "EXCEPTION_HANDLER": "agentplatform.errors.drf_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Agent Platform API",
    "DESCRIPTION": "Agents, sessions and an OpenAI-compatible endpoint. Authenticate with `Authorization: Bearer <key>`.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Several fields are called `role` with different choices: name each set.
    "ENUM_NAME_OVERRIDES": {
        "ApiKeyRoleEnum": "governance.models.ApiKey.Role",
        "MessageRoleEnum": "agents.models.Message.Role",
        "InputMessageRoleEnum": ["system", "user", "assistant"],
        "OpenAIMessageRoleEnum": ["system", "developer", "user", "assistant", "tool"],
    },
}

# --- Logging ------------------------------------------------------------------------------
LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, not {LOG_LEVEL!r}.")
# json: one JSON object a line (agentplatform.logs); text: for people. Default: text when stderr
# is a terminal, json otherwise (containers, log shippers).
LOG_FORMAT = env.str("LOG_FORMAT", default="text" if sys.stderr.isatty() else "json").lower()
if LOG_FORMAT not in ("json", "text"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, not {LOG_FORMAT!r}.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "agentplatform.logs.JsonFormatter"},
    },
    # Every record gets its request id (and trace id), then is masked (e-mail addresses, phone
    # numbers, keys, tokens, card numbers); the JSON formatter masks every field it writes too.
    "filters": {"context": {"()": "agentplatform.logs.ContextFilter"},
                "mask": {"()": "governance.masking.MaskingFilter"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT,
                             "filters": ["context", "mask"]}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "daphne": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "openai": {"level": "WARNING"},
    },
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Pipeline stages around every chat turn (dotted paths; see agents/pipeline.py). Governance and
# billing register theirs here.
AGENT_PIPELINE_STAGES: list[str] = [
    # First: it times and counts every turn, refused ones included (its `refused` sees them all).
    "agentplatform.metrics.MetricsStage",
    # Before the flag and budget stages: they see the variant's skills and models.
    "experiments.stages.ExperimentStage",
    "governance.guards.InputGuardStage",
    "governance.flags.FeatureFlagStage",
    "governance.ratelimit.RateLimitStage",
    "billing.budgets.BudgetStage",
    "governance.audit.AuditStage",
    "governance.keys.KeyUsageStage",
    "billing.metering.MeteringStage",
    "agents.runs.AsyncRunStage",
]

# --- Governance ---------------------------------------------------------------------------
# While the rate limiter's Redis is unavailable: "open" lets turns through unchecked, "closed"
# refuses them with 503 `rate_limiter_unavailable`; both are logged and counted
# (rate_limit_unchecked_total{mode}).
RATE_LIMIT_FAIL_MODE = env.str("RATE_LIMIT_FAIL_MODE", default="open").strip().lower()
if RATE_LIMIT_FAIL_MODE not in ("open", "closed"):
    raise ImproperlyConfigured("RATE_LIMIT_FAIL_MODE must be 'open' or 'closed'.")
# How long an Idempotency-Key's stored response is replayed.
IDEMPOTENCY_TTL_SECONDS = env.int("IDEMPOTENCY_TTL_SECONDS", default=24 * 3600)
# A retry that arrives while the first request still runs waits this long, then gets 409.
IDEMPOTENCY_WAIT_SECONDS = env.int("IDEMPOTENCY_WAIT_SECONDS", default=60)
# A claim still "running" after this long belongs to a dead worker and is taken over.
IDEMPOTENCY_STALE_SECONDS = env.int("IDEMPOTENCY_STALE_SECONDS", default=600)
# Grace period of a rotated key's previous secret, unless the rotation says otherwise.
API_KEY_ROTATION_GRACE_SECONDS = env.int("API_KEY_ROTATION_GRACE_SECONDS", default=24 * 3600)
# How often `manage.py audit_sequencer` chains the audit entries committed since (PostgreSQL).
AUDIT_SEQUENCER_INTERVAL_SECONDS = env.float("AUDIT_SEQUENCER_INTERVAL_SECONDS", default=0.5)
if not AUDIT_SEQUENCER_INTERVAL_SECONDS > 0:
    raise ImproperlyConfigured("AUDIT_SEQUENCER_INTERVAL_SECONDS must be > 0.")

# --- Billing ------------------------------------------------------------------------------
# USD per 1M tokens for a model without a ModelPrice row; records made with it are flagged
# priced=False. Decimal strings; a malformed value fails at startup.
def _decimal_setting(name: str, default: str, what: str = "USD per 1M tokens"):
    from decimal import Decimal, InvalidOperation

    raw = env.str(name, default=default)
    try:
        value = Decimal(raw)
    except InvalidOperation:
        raise ImproperlyConfigured(f"{name} must be a decimal number ({what}), not {raw!r}.") from None
    if not value.is_finite() or value < 0:
        raise ImproperlyConfigured(f"{name} must be a finite number >= 0, not {raw!r}.")
    return value


BILLING_DEFAULT_INPUT_PER_1M = _decimal_setting("BILLING_DEFAULT_INPUT_PER_1M", "10")
BILLING_DEFAULT_OUTPUT_PER_1M = _decimal_setting("BILLING_DEFAULT_OUTPUT_PER_1M", "30")

# --- Experiments --------------------------------------------------------------------------
# Shadow traffic stops for the day (UTC) once the shadow runs of all experiments cost this
# much (USD); empty: no cap. Shadow spend is never billed to the callers' keys or budgets.
EXPERIMENT_SHADOW_DAILY_LIMIT_USD = (_decimal_setting("EXPERIMENT_SHADOW_DAILY_LIMIT_USD", "0", "USD per day")
                                     if env.str("EXPERIMENT_SHADOW_DAILY_LIMIT_USD", default="") else None)


# --- Budget alerts and e-mail -------------------------------------------------------------
# Where alerts go when a budget names no recipients / webhook of its own (billing.alerts).
BUDGET_ALERT_EMAILS = env.list("BUDGET_ALERT_EMAILS", default=[])
BUDGET_ALERT_WEBHOOK_URL = env.str("BUDGET_ALERT_WEBHOOK_URL", default="")
# Signs webhook bodies: X-AgentPlatform-Signature: sha256=<hex HMAC-SHA256 of the body>.
BUDGET_ALERT_WEBHOOK_SECRET = env.str("BUDGET_ALERT_WEBHOOK_SECRET", default="")
BUDGET_ALERT_WEBHOOK_TIMEOUT = env.float("BUDGET_ALERT_WEBHOOK_TIMEOUT", default=10.0)
# A delivery is tried 1 + this many times (backoff 30 s, 60 s, 120 s, ... at most an hour),
# then kept as a dead letter (status "dead" in the admin, which can retry it).
BUDGET_ALERT_MAX_RETRIES = env.int("BUDGET_ALERT_MAX_RETRIES", default=5)
BUDGET_ALERT_RETRY_BACKOFF_SECONDS = env.float("BUDGET_ALERT_RETRY_BACKOFF_SECONDS", default=30.0)
# Reservations left on a past period's budget row untouched this long belong to a crashed
# worker: the hourly rollover releases them.
BUDGET_STALE_RESERVATION_SECONDS = env.int("BUDGET_STALE_RESERVATION_SECONDS", default=3600)


def _check_alert_settings() -> None:
    from django.core.exceptions import ValidationError
    from django.core.validators import URLValidator, validate_email

    for address in BUDGET_ALERT_EMAILS:
        try:
            validate_email(address)
        except ValidationError:
            raise ImproperlyConfigured(f"BUDGET_ALERT_EMAILS: {address!r} is not an e-mail address.") from None
    if BUDGET_ALERT_WEBHOOK_URL:
        try:
            URLValidator(schemes=["http", "https"])(BUDGET_ALERT_WEBHOOK_URL)
        except ValidationError:
            raise ImproperlyConfigured("BUDGET_ALERT_WEBHOOK_URL must be an http(s) URL.") from None
    if BUDGET_ALERT_MAX_RETRIES < 0 or BUDGET_ALERT_RETRY_BACKOFF_SECONDS < 0 or BUDGET_ALERT_WEBHOOK_TIMEOUT <= 0:
        raise ImproperlyConfigured("BUDGET_ALERT_MAX_RETRIES and BUDGET_ALERT_RETRY_BACKOFF_SECONDS must be >= 0, "
                                   "BUDGET_ALERT_WEBHOOK_TIMEOUT > 0.")


_check_alert_settings()

# E-mail: EMAIL_URL (django-environ: smtp://user:pass@host:25, smtp+tls://...:587,
# submission://..., consolemail://) when set; else the console under DEBUG, and Django's SMTP
# backend on localhost:25 otherwise.
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="agent-platform@localhost")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
if env.str("EMAIL_URL", default=""):
    globals().update({k: v for k, v in env.email_url("EMAIL_URL").items() if v is not None})
elif DEBUG:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
