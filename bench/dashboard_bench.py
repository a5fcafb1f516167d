#!/usr/bin/env python
"""The cost dashboard at 1,000,000 usage records: its queries through the daily rollups against
the same aggregates straight over UsageRecord, on a throwaway SQLite file and (when reachable) a
throwaway PostgreSQL database.

    .venv/bin/python bench/dashboard_bench.py [--rows 1000000] [--days 90] [--repeat 5]
        [--database-url postgres://postgres@127.0.0.1:5432/postgres | --no-postgres]
        [--no-sqlite] [--drop-caches] [--keep] [--json-only]

Per backend: `migrate` into a fresh database (SQLite: a temp VAR_DIR; PostgreSQL: a database
`ap_dash_bench_<pid>` created on that server and dropped at the end), 6 agents, 40 API keys,
3 budgets, then --rows usage records (about 2 per run, 5 % of runs falling back to a second
model, so about rows/2 Run rows too) spread over --days days ending now, bulk-inserted in time
order as the platform writes them (executemany on SQLite, COPY on PostgreSQL), ANALYZE (VACUUM ANALYZE on PostgreSQL), and
`rollup_pending_days()` timed. Then every case runs in a process of its own:

    first   its first run in that new process: new database connection, empty SQLite page
            cache (and, with --drop-caches, an empty OS page cache: `echo 3 >
            /proc/sys/vm/drop_caches`, root only; PostgreSQL's shared buffers stay warm)
    warm    the median (and min) of --repeat more runs

Cases (range = the dashboard's default last 30 days, or all 90):
    dashboard 30d / 90d         billing.dashboard.dashboard_data: totals, per day, agent, model,
                                key, top consumers, budgets with burn-downs (all the page's queries)
    dashboard 30d agent=        the same with an agent filter
    page 30d                    GET /admin/billing/dashboard/ through Django's test client (signed-in
                                superuser): the queries plus the template
    csv daily 90d               ?format=csv&section=daily
    plan 30d / 90d              only the rollup check (which days the rollups may answer)
    naive 30d / 90d             the same groupings straight over UsageRecord (total, day, agent,
                                model, key, key × agent: what the dashboard would cost without
                                rollups; same run, same data)
    late record 30d             the dashboard after one record arrived in an already rolled-up day
                                (that day read from the records until rebuilt)
    api usage 30d / 90d         GET /api/v1/usage?group_by=day through Django's test client (an admin
                                API key): billing.rollups, as the endpoint answers now
    api direct 30d / 90d        the same answer (total + per day) straight over UsageRecord, as the
                                endpoint computed it before it used the rollups
    rollup query 1d             the aggregate rollup_day runs for one day (requests = records that
                                start their run: SUM of the starts_run flag metering writes)
    rollup query distinct 1d    the same aggregate with requests = COUNT(DISTINCT run_id), the
                                previous per-model rule

It prints a table per backend with the ratios naive / dashboard, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
CASES = ["dashboard 30d", "dashboard 90d", "dashboard 30d agent=", "page 30d", "csv daily 90d", "plan 30d",
         "plan 90d", "naive 30d", "naive 90d", "late record 30d", "api usage 30d", "api usage 90d",
         "api direct 30d", "api direct 90d", "rollup query 1d", "rollup query distinct 1d"]
AGENTS = [("assistant", "openai/gpt-4o-mini"), ("researcher", "openai/gpt-4.1"), ("coder", "anthropic/claude-sonnet-4"),
          ("triage", "openai/gpt-4.1-nano"), ("summarizer", "anthropic/claude-3-5-haiku"), ("support", "openai/gpt-4o")]
FALLBACK = {"openai/gpt-4o-mini": "anthropic/claude-3-5-haiku", "openai/gpt-4.1": "anthropic/claude-sonnet-4",
            "anthropic/claude-sonnet-4": "openai/gpt-4.1", "openai/gpt-4.1-nano": "openai/gpt-4o-mini",
            "anthropic/claude-3-5-haiku": "openai/gpt-4o-mini", "openai/gpt-4o": "openai/gpt-4.1"}


# --- worker side (a process with Django set up against the throwaway database) ---------------


def _setup_django() -> None:
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentplatform.settings")
    import django

    django.setup()


def _prep(model, values: dict):
    """The model's concrete columns (minus an auto id) and a function making one row's values:
    given values as they go to the database, the others at their field default."""
    from django.db import connection

    fields = [f for f in model._meta.concrete_fields if not (f.primary_key and f.get_internal_type().endswith("AutoField"))]
    defaults = {}
    for f in fields:
        if f.attname not in values:
            defaults[f.attname] = f.get_db_prep_save(f.get_default(), connection)
    columns = [f.column for f in fields]
    names = [f.attname for f in fields]
    return columns, names, defaults


def worker_load(rows: int, days: int) -> dict:
    _setup_django()
    from datetime import timedelta
    from decimal import Decimal

    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import connection, transaction
    from django.utils import timezone

    from agents.models import Agent, Run
    from billing.budgets import budget_create
    from billing.models import UsageRecord
    from billing.rollups import rollup_pending_days
    from governance.services import api_key_create

    t0 = time.perf_counter()
    call_command("migrate", verbosity=0)
    migrate_s = time.perf_counter() - t0
    get_user_model().objects.create_superuser("bench", "bench@example.com", "bench")
    agents = [Agent.objects.create(name=name, model=model) for name, model in AGENTS]
    keys = [api_key_create(name=f"key-{i:02d}", role="client")[0] for i in range(40)]
    budget_create(scope="global", period="month", limit_usd=Decimal("5000"), name="platform")
    budget_create(scope="agent", agent_name="coder", period="week", limit_usd=Decimal("400"))
    budget_create(scope="key", key_prefix=keys[0].prefix, period="day", limit_usd=Decimal("20"))

    rng = random.Random(7)
    now = timezone.now()
    span = days * 86400
    ops = connection.ops
    run_pk = Run._meta.pk
    uuid_prep = (lambda u: run_pk.get_db_prep_value(u, connection)) if connection.vendor == "sqlite" else (lambda u: u)
    run_cols, run_names, run_defaults = _prep(Run, {"id", "agent_id", "api_key_id", "status", "transport", "model",
                                                    "prompt_tokens", "completion_tokens", "total_tokens", "steps",
                                                    "started_at", "finished_at", "latency_ms"})
    rec_cols, rec_names, rec_defaults = _prep(UsageRecord, {"created_at", "run_id", "api_key_id", "agent_id", "model",
                                                            "prompt_tokens", "completion_tokens", "cost_usd",
                                                            "starts_run"})
    prices = {m: (Decimal(rng.choice(["0.15", "0.4", "2.5", "3"])), Decimal(rng.choice(["0.6", "1.6", "10", "15"])))
              for m in sorted({m for _, m in AGENTS} | set(FALLBACK.values()))}
    # Keys use one or two agents each; some keys are busier than others.
    key_agents = [(k, rng.sample(agents, rng.choice([1, 1, 2]))) for k in keys]
    weights = [rng.paretovariate(1.5) for _ in keys]

    def dt(value):
        return ops.adapt_datetimefield_value(value)

    def money(value: Decimal):
        return ops.adapt_decimalfield_value(value, 18, 8)

    run_rows, rec_rows = [], []
    made = 0
    while made < rows:
        key, its_agents = rng.choices(key_agents, weights)[0]
        agent = rng.choice(its_agents)
        started = now - timedelta(seconds=rng.random() * span)
        calls = min(rng.choice([1, 1, 2, 2, 3]), rows - made)
        run_id = uuid.uuid4()
        fallback = rng.random() < 0.05
        prompt_total = completion_total = 0
        for step in range(calls):
            model = FALLBACK[agent.model] if fallback and step == calls - 1 and calls > 1 else agent.model
            prompt, completion = rng.randint(200, 6000), rng.randint(20, 800)
            inp, out = prices[model]
            cost = ((prompt * inp + completion * out) / Decimal(1_000_000)).quantize(Decimal("0.00000001"))
            at = started + timedelta(seconds=step * 2)
            if at > now:
                at = now
            rec = {"created_at": dt(at), "run_id": uuid_prep(run_id), "api_key_id": key.id, "agent_id": agent.id,
                   "model": model, "prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": money(cost),
                   "starts_run": step == 0}  # as metering writes it: the run's first call
            rec_rows.append(tuple(rec[n] if n in rec else rec_defaults[n] for n in rec_names))
            prompt_total += prompt
            completion_total += completion
        made += calls
        run = {"id": uuid_prep(run_id), "agent_id": agent.id, "api_key_id": key.id, "status": "succeeded",
               "transport": "openai", "model": agent.model, "prompt_tokens": prompt_total,
               "completion_tokens": completion_total, "total_tokens": prompt_total + completion_total, "steps": calls,
               "started_at": dt(started), "finished_at": dt(started + timedelta(seconds=2 * calls)),
               "latency_ms": 900 * calls}
        run_rows.append(tuple(run[n] if n in run else run_defaults[n] for n in run_names))
    # Stored in time order, as the platform writes them (a run's records when it ends).
    run_rows.sort(key=lambda row: row[run_names.index("started_at")])
    rec_rows.sort(key=lambda row: row[rec_names.index("created_at")])
    generate_s = time.perf_counter() - t0 - migrate_s

    t1 = time.perf_counter()
    run_table, rec_table = Run._meta.db_table, UsageRecord._meta.db_table
    with transaction.atomic():
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                raw = cursor.cursor  # psycopg's own cursor: COPY
                for table, cols, data in ((run_table, run_cols, run_rows), (rec_table, rec_cols, rec_rows)):
                    with raw.copy(f"COPY {table} ({', '.join(cols)}) FROM STDIN") as copy:
                        for row in data:
                            copy.write_row(row)
            else:
                for table, cols, data in ((run_table, run_cols, run_rows), (rec_table, rec_cols, rec_rows)):
                    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('%s' for _ in cols)})"
                    for i in range(0, len(data), 50_000):
                        cursor.executemany(sql, data[i:i + 50_000])
    insert_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"VACUUM ANALYZE {run_table}")
            cursor.execute(f"VACUUM ANALYZE {rec_table}")
        else:
            cursor.execute("ANALYZE")
    analyze_s = time.perf_counter() - t2

    t3 = time.perf_counter()
    rolled = rollup_pending_days()
    rollup_s = time.perf_counter() - t3
    from billing.models import UsageRollup

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("VACUUM ANALYZE billing_usagerollup")
    return {"rows": UsageRecord.objects.count(), "runs": len(run_rows), "rollup_rows": UsageRollup.objects.count(),
            "migrate_s": migrate_s, "generate_s": generate_s, "insert_s": insert_s, "analyze_s": analyze_s,
            "rollup_s": rollup_s, "rollup_days": rolled}


def _naive(start, end) -> dict:
    """The dashboard's groupings straight over UsageRecord (as GET /api/v1/usage computes them)."""
    from datetime import timezone as dt_timezone
    from decimal import Decimal

    from django.db.models import Count, F, Sum
    from django.db.models.functions import Coalesce, TruncDate

    from billing.models import UsageRecord

    sums = {"requests": Count("run_id", distinct=True), "calls": Count("id"),
            "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0), "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
            "cost_usd": Coalesce(Sum("cost_usd"), Decimal("0"))}
    rows = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end).order_by()
    out = {"total": rows.aggregate(**sums)}
    out["day"] = list(rows.annotate(g=TruncDate("created_at", tzinfo=dt_timezone.utc)).values("g").annotate(**sums))
    out["agent"] = list(rows.annotate(g=F("agent__name")).values("g").annotate(**sums))
    out["model"] = list(rows.values("model").annotate(**sums))
    out["key"] = list(rows.annotate(g=F("api_key__prefix")).values("g").annotate(**sums))
    out["top"] = list(rows.values("api_key__prefix", "agent__name").annotate(**sums).order_by("-cost_usd")[:10])
    return out


def _api_direct(start, end) -> dict:
    """GET /api/v1/usage?group_by=day as it was computed before the rollups: total and per day
    straight over UsageRecord, requests = distinct runs per group."""
    from datetime import timezone as dt_timezone
    from decimal import Decimal

    from django.db.models import Count, Sum
    from django.db.models.functions import Coalesce, TruncDay

    from billing.models import UsageRecord

    sums = {"requests": Count("run_id", distinct=True), "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
            "completion_tokens": Coalesce(Sum("completion_tokens"), 0), "cost_usd": Coalesce(Sum("cost_usd"), Decimal("0"))}
    rows = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end).order_by()
    return {"total": rows.aggregate(**sums),
            "groups": list(rows.annotate(group=TruncDay("created_at", tzinfo=dt_timezone.utc)).values("group")
                           .annotate(**sums).order_by("group"))}


def _rollup_query(day, distinct: bool):
    """The aggregate rollup_day runs for one day (without writing the rows)."""
    from datetime import timedelta

    from django.db.models import Count

    from billing.models import UsageRecord
    from billing.rollups import _FINE, _midnight, _record_sums

    sums = _record_sums()
    if distinct:
        sums["requests"] = Count("run_id", distinct=True)
    start = _midnight(day)
    return (UsageRecord.objects.filter(created_at__gte=start, created_at__lt=start + timedelta(days=1)).order_by()
            .values(*_FINE).annotate(**sums))


def worker_case(case: str, repeat: int) -> dict:
    _setup_django()
    from datetime import timedelta

    from django.db import connections
    from django.test import Client
    from django.utils import timezone

    from billing.dashboard import DashboardQuery, dashboard_data, dashboard_data_for
    from billing.rollups import usage_plan

    today = timezone.now().date()
    d30 = {"from": (today - timedelta(days=29)).isoformat(), "to": today.isoformat()}
    d90 = {"from": (today - timedelta(days=89)).isoformat(), "to": today.isoformat()}
    client = None
    extra: dict = {}

    def bounds(params):
        q = DashboardQuery(date_from=timezone.datetime.fromisoformat(params["from"]).date(),
                           date_to=timezone.datetime.fromisoformat(params["to"]).date())
        return q.start, q.end

    if case.startswith("page") or case.startswith("csv"):
        from django.contrib.auth import get_user_model

        client = Client()
        client.force_login(get_user_model().objects.get(username="bench"))
        # Load the URLconf, the admin and the template (a 400 page: no usage query), so that
        # `first` measures the database, not Python's imports and template compilation.
        assert client.get("/admin/billing/dashboard/", {"from": "warm-up"}).status_code == 400
        connections.close_all()

    if case.startswith("api usage"):
        from governance.services import api_key_create

        client = Client()
        _, secret = api_key_create(name=f"bench-admin-{os.getpid()}", role="admin")
        client.defaults["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
        assert client.get("/api/v1/usage", {"group_by": "week"}).status_code == 400  # imports, URLconf
        connections.close_all()
    rollup_day_probe = today - timedelta(days=5)
    if case.startswith("rollup query"):
        extra["plan"] = _rollup_query(rollup_day_probe, "distinct" in case).explain()
        connections.close_all()

    if case == "late record 30d":
        import uuid as _uuid
        from decimal import Decimal

        from billing.models import UsageRecord

        template = UsageRecord.objects.order_by("-id").first()
        late_day = today - timedelta(days=12)
        extra["late_record_day"] = late_day.isoformat()
        from datetime import datetime, time as dtime, timezone as dt_timezone

        late = UsageRecord.objects.create(created_at=datetime.combine(late_day, dtime(23, 59), tzinfo=dt_timezone.utc),
                                          api_key_id=template.api_key_id,
                                          agent_id=template.agent_id, model=template.model, prompt_tokens=10,
                                          completion_tokens=1, cost_usd=Decimal("0.001"), request_id=str(_uuid.uuid4()))
        connections.close_all()

    def run() -> object:
        if case == "dashboard 30d" or case == "late record 30d":
            return dashboard_data_for(d30)
        if case == "dashboard 90d":
            return dashboard_data_for(d90)
        if case == "dashboard 30d agent=":
            return dashboard_data_for({**d30, "agent": "coder"})
        if case == "page 30d":
            response = client.get("/admin/billing/dashboard/", d30)
            assert response.status_code == 200, response.status_code
            return len(response.content)
        if case == "csv daily 90d":
            response = client.get("/admin/billing/dashboard/", {**d90, "format": "csv", "section": "daily"})
            assert response.status_code == 200, response.status_code
            return len(response.content)
        if case == "plan 30d":
            return usage_plan(*bounds(d30))
        if case == "plan 90d":
            return usage_plan(*bounds(d90))
        if case == "naive 30d":
            return _naive(*bounds(d30))
        if case == "naive 90d":
            return _naive(*bounds(d90))
        if case in ("api usage 30d", "api usage 90d"):
            response = client.get("/api/v1/usage", {**(d30 if "30d" in case else d90), "group_by": "day"})
            assert response.status_code == 200, response.status_code
            return response.json()
        if case in ("api direct 30d", "api direct 90d"):
            return _api_direct(*bounds(d30 if "30d" in case else d90))
        if case.startswith("rollup query"):
            return list(_rollup_query(rollup_day_probe, "distinct" in case))
        raise SystemExit(f"unknown case {case!r}")

    t0 = time.perf_counter()
    result = run()
    first = time.perf_counter() - t0
    warm = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        warm.append(time.perf_counter() - t0)
    if isinstance(result, dict) and "source" in result:
        extra["source"] = result["source"]
        extra["total_cost_usd"] = str(result["total"]["cost_usd"])
    if case == "late record 30d":
        from billing.rollups import rollup_pending_days

        t0 = time.perf_counter()
        extra["healed_days"] = rollup_pending_days()
        extra["heal_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run()
        extra["after_heal_s"] = time.perf_counter() - t0
        late.delete()
        from billing.rollups import rollup_day

        rollup_day(late_day)
    return {"case": case, "first_s": first, "warm_median_s": statistics.median(warm), "warm_min_s": min(warm), **extra}


# --- the driver -------------------------------------------------------------------------------


def _env(var_dir: Path, database_url: str | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "TEST_DATABASE_NAME",
                        "READ_DOT_ENV", "SECRET_KEY")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", ALLOW_INSECURE_SECRET_KEY="true",
               VAR_DIR=str(var_dir), LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    if database_url:
        env["DATABASE_URL"] = database_url
        env["DATABASE_POOL_MIN_SIZE"] = "1"
    return env


def _worker(env: dict, *args: str, timeout: float = 3600) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"worker {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout=2).close()
        return True
    except OSError:
        return False


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def bench_backend(label: str, env: dict, args) -> dict:
    say = (lambda *a: None) if args.json_only else (lambda *a: print(*a, file=sys.stderr, flush=True))
    say(f"[{label}] loading {args.rows:,} usage records over {args.days} days ...")
    load = _worker(env, "load", "--rows", str(args.rows), "--days", str(args.days))
    say(f"[{label}] inserted in {load['insert_s']:.1f} s, rolled up {load['rollup_days']} days "
        f"({load['rollup_rows']:,} rollup rows) in {load['rollup_s']:.1f} s")
    cases = {}
    for case in CASES:
        dropped = _drop_caches() if args.drop_caches else False
        cases[case] = _worker(env, "case", case, "--repeat", str(args.repeat))
        cases[case]["os_cache_dropped"] = dropped
        say(f"[{label}] {case:<22} first {cases[case]['first_s'] * 1000:8.1f} ms   "
            f"warm {cases[case]['warm_median_s'] * 1000:8.1f} ms")
    return {"backend": label, "load": load, "cases": cases}


def print_table(result: dict) -> None:
    load, cases = result["load"], result["cases"]
    print(f"\n{result['backend']}: {load['rows']:,} usage records ({load['runs']:,} runs), "
          f"{load['rollup_rows']:,} rollup rows; insert {load['insert_s']:.1f} s, "
          f"rollup of {load['rollup_days']} days {load['rollup_s']:.1f} s")
    print(f"{'case':<24}{'first ms':>10}{'warm ms':>10}{'min ms':>10}")
    for case in CASES:
        c = cases[case]
        print(f"{case:<24}{c['first_s'] * 1000:>10.1f}{c['warm_median_s'] * 1000:>10.1f}{c['warm_min_s'] * 1000:>10.1f}")
    for days in ("30d", "90d"):
        naive, dash = cases[f"naive {days}"], cases[f"dashboard {days}"]
        print(f"naive / dashboard {days}: first {naive['first_s'] / dash['first_s']:.1f}x, "
              f"warm {naive['warm_median_s'] / dash['warm_median_s']:.1f}x")
    for days in ("30d", "90d"):
        direct, api = cases[f"api direct {days}"], cases[f"api usage {days}"]
        print(f"GET /api/v1/usage {days}: direct over UsageRecord / through rollups: "
              f"first {direct['first_s'] / api['first_s']:.1f}x, warm {direct['warm_median_s'] / api['warm_median_s']:.1f}x")
    late = cases["late record 30d"]
    print(f"late record in {late.get('late_record_day')}: stale days {late.get('source', {}).get('stale_days')}, "
          f"warm {late['warm_median_s'] * 1000:.1f} ms; rollup_pending_days healed {late.get('healed_days')} days "
          f"in {late.get('heal_s', 0) * 1000:.0f} ms, then {late.get('after_heal_s', 0) * 1000:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--database-url", default="postgres://postgres@127.0.0.1:5432/postgres",
                        help="A PostgreSQL server (any database on it) where a throwaway database is made.")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--drop-caches", action="store_true",
                        help="Empty the OS page cache before each case (root only; affects the whole machine).")
    parser.add_argument("--keep", action="store_true", help="Keep the temp dir (and the PostgreSQL database).")
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args()

    if args.worker:
        kind, *rest = args.worker
        if kind == "load":
            out = worker_load(args.rows, args.days)
        else:
            out = worker_case(rest[0], args.repeat)
        print(json.dumps(out))
        return 0

    results = []
    temp = Path(tempfile.mkdtemp(prefix="dashboard-bench-"))
    try:
        if not args.no_sqlite:
            results.append(bench_backend("sqlite", _env(temp / "sqlite", None), args))
        if not args.no_postgres:
            if not _reachable(args.database_url):
                print(f"PostgreSQL at {urlsplit(args.database_url).netloc} is not reachable: skipped", file=sys.stderr)
            else:
                import psycopg

                name = f"ap_dash_bench_{os.getpid()}"
                with psycopg.connect(args.database_url, autocommit=True) as admin:
                    admin.execute(f'CREATE DATABASE "{name}"')
                try:
                    results.append(bench_backend("postgresql", _env(temp / "pg", _with_db(args.database_url, name)), args))
                finally:
                    if not args.keep:
                        with psycopg.connect(args.database_url, autocommit=True) as admin:
                            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        if args.keep:
            print(f"kept {temp}", file=sys.stderr)
        else:
            shutil.rmtree(temp, ignore_errors=True)
    if not args.json_only:
        for result in results:
            print_table(result)
    print(json.dumps({"rows": args.rows, "days": args.days, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
