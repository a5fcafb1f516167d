"""The cost dashboard in a real browser: a daphne server (DEBUG off, its own SQLite file) and
Debian's Chromium driven by Playwright. Sign in through the admin's login form, wait for the
charts (Chart.js, vendored) and the tables, check the numbers, apply a date filter, export a CSV;
a full-page screenshot is kept as a test artifact (dashboard.png)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time

import pytest

from conftest import (PAGE_CSP, ROOT, artifact_path, csp_directives, spawn_daphne, stop_processes, wait_ready,
                      watch_csp_violations)

pytestmark = pytest.mark.slow

SETUP = """
import json, sys, uuid
from datetime import datetime, time, timedelta, timezone as dt_timezone
from decimal import Decimal
import django
django.setup()
from django.core.management import call_command
call_command("migrate", verbosity=0)
from django.contrib.auth import get_user_model
from django.utils import timezone
from agents.models import Agent, Run
from billing.budgets import budget_create, period_start
from billing.models import BudgetSpend, UsageRecord
from billing.rollups import rollup_pending_days
from governance.services import api_key_create

get_user_model().objects.create_superuser("boss", "boss@example.com", sys.argv[1])
now = timezone.now()
today = now.astimezone(dt_timezone.utc).date()
agents = {name: Agent.objects.create(name=name, model=model) for name, model in
          [("writer", "openai/gpt-4o-mini"), ("coder", "anthropic/claude-sonnet-4"), ("triage", "openai/gpt-4.1-nano")]}
keys = {name: api_key_create(name=name, role="client")[0] for name in ("web-app", "batch-jobs", "ci")}
plan = [  # days ago, agent, key, records per day, cost of each
    ("writer", "web-app", "0.0125"), ("coder", "batch-jobs", "0.04"), ("triage", "ci", "0.002"),
    ("writer", "batch-jobs", "0.01"),
]
rows = []
for ago in range(13, -1, -1):
    day = today - timedelta(days=ago)
    for index, (agent, key, cost) in enumerate(plan):
        for n in range(2 + (ago * (index + 1)) % 5):
            when = datetime.combine(day, time(min(n, 23), 0), tzinfo=dt_timezone.utc)
            if when > now:
                when = datetime.combine(day, time(0, 0), tzinfo=dt_timezone.utc)
            run = Run.objects.create(agent=agents[agent], api_key=keys[key], transport="rest", started_at=when,
                                     status="succeeded")
            rows.append(UsageRecord(created_at=when, agent=agents[agent], api_key=keys[key],
                                    model=agents[agent].model, run=run, prompt_tokens=900 + 10 * n,
                                    completion_tokens=150, cost_usd=Decimal(cost), request_id=str(uuid.uuid4()),
                                    starts_run=True))
UsageRecord.objects.bulk_create(rows)
rollup_pending_days(now=now)
monthly = budget_create(scope="global", period="month", limit_usd=Decimal("5"), name="Platform")
weekly = budget_create(scope="agent", agent_name="coder", period="week", limit_usd=Decimal("2"), hard=False)
spent = sum((r.cost_usd for r in rows if r.created_at >= period_start("month", now)), Decimal("0"))
BudgetSpend.objects.create(budget=monthly, period_start=period_start("month", now), spent_usd=spent)
coder_week = sum((r.cost_usd for r in rows if r.agent.name == "coder" and r.created_at >= period_start("week", now)),
                 Decimal("0"))
BudgetSpend.objects.create(budget=weekly, period_start=period_start("week", now), spent_usd=coder_week)
total = sum((r.cost_usd for r in rows if r.created_at.date() > today - timedelta(days=30)), Decimal("0"))
yesterday = today - timedelta(days=1)
day_total = sum((r.cost_usd for r in rows if r.created_at.date() == yesterday), Decimal("0"))
coder = sum((r.cost_usd for r in rows if r.agent.name == "coder"), Decimal("0"))
print(json.dumps({"total": str(total), "requests": len(rows), "yesterday": yesterday.isoformat(),
                  "day_total": str(day_total), "day_requests": sum(1 for r in rows if r.created_at.date() == yesterday),
                  "coder": str(coder), "budget_spent": str(spent)}))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    var_dir = tmp_path_factory.mktemp("dashboard-var")
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "REDIS_URL", "CACHE_URL", "CELERY_BROKER_URL", "CELERY_TASK_ALWAYS_EAGER",
                        "TEST_DATABASE_NAME", "METRICS_TOKEN", "ALLOW_INSECURE_SECRET_KEY", "READ_DOT_ENV")}
    env.update(DJANGO_SETTINGS_MODULE="agentplatform.settings", DEBUG="0", SECRET_KEY=secrets.token_urlsafe(50),
               VAR_DIR=str(var_dir), LOG_LEVEL="WARNING", SERVE_STATIC="true")
    password = secrets.token_urlsafe(16)
    setup = subprocess.run([sys.executable, "-c", SETUP, password], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=180)
    assert setup.returncode == 0, setup.stderr
    facts = json.loads(setup.stdout.strip().splitlines()[-1])
    log_path = var_dir / "daphne.log"
    process, url = spawn_daphne(env, log_path)
    try:
        wait_ready(process, url, log_path, time.monotonic() + 30)
        yield {"url": url, "password": password, **facts}
    finally:
        stop_processes([process])


def usd(text: str) -> str:
    value = float(text)
    return f"{value:,.2f}" if value >= 1 else f"{value:,.6f}"


def charts_ready(page) -> int:
    page.wait_for_selector("body[data-charts-ready]", timeout=15_000)
    ready = page.get_attribute("body", "data-charts-ready")
    assert ready.isdigit(), ready
    return int(ready)


def drawn_canvases(page) -> list[dict]:
    """Each canvas: whether Chart.js owns it, its size, and how many of its pixels are painted."""
    return page.evaluate("""() => [...document.querySelectorAll('canvas')].map(c => {
        const data = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let painted = 0;
        for (let i = 3; i < data.length; i += 4) { if (data[i] > 0) painted++; }
        return {id: c.id, chart: !!window.Chart.getChart(c), width: c.width, height: c.height, painted};
    })""")


def test_the_dashboard_renders_in_a_browser(server, chromium):
    context = chromium.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    script_errors: list[str] = []
    failed: list[str] = []
    page.on("pageerror", lambda error: script_errors.append(f"page error: {error}"))
    # Failed loads are tracked below by URL (the browser's own favicon request is not the page's).
    page.on("console", lambda message: script_errors.append(f"console: {message.text}")
            if message.type == "error" and not message.text.startswith("Failed to load resource") else None)
    page.on("response", lambda response: failed.append(f"{response.status} {response.url}")
            if response.status >= 400 else None)
    watch_csp_violations(page, script_errors)
    try:
        page.goto(f"{server['url']}/admin/billing/dashboard/")
        assert "/admin/login/" in page.url  # staff only: the admin's login page first
        page.fill("#id_username", "boss")
        page.fill("#id_password", server["password"])
        with page.expect_response(f"{server['url']}/admin/billing/dashboard/") as dashboard_response:
            page.click("input[type=submit]")
        page.wait_for_url("**/admin/billing/dashboard/", timeout=15_000)
        assert csp_directives(dashboard_response.value.headers["content-security-policy"]) == PAGE_CSP

        charts = charts_ready(page)
        assert charts == 4 + 2  # per day, agent, model, key; two budgets' burn-downs
        canvases = drawn_canvases(page)
        assert len(canvases) == charts
        for canvas in canvases:
            assert canvas["chart"] and canvas["width"] > 200 and canvas["height"] > 100, canvas
            assert canvas["painted"] > 500, canvas  # bars and lines, not a blank canvas

        assert page.inner_text("#total-cost") == usd(server["total"])
        assert page.inner_text("#total-requests") == f"{server['requests']:,}"
        agents = page.locator("#table-agents tbody tr")
        assert agents.count() == 3
        assert agents.nth(0).locator("td").nth(0).inner_text() == "coder"  # the biggest spender first
        assert agents.nth(0).locator("td").nth(2).inner_text() == f"{float(server['coder']):,.6f}"
        assert page.locator("#table-daily tbody tr").count() == 30
        assert page.locator("#table-top tbody tr").count() == 4
        budgets = page.locator("#table-budgets tbody tr")
        assert budgets.count() == 2
        platform = page.locator("#table-budgets tbody tr", has_text="Platform")
        assert platform.locator("td").nth(4).inner_text() == f"{float(server['budget_spent']):,.6f}"
        page.screenshot(path=str(artifact_path("dashboard.png")), full_page=True)

        # The CSV link of a table downloads that table, with the signed-in session.
        href = page.get_attribute("#section-agents a.dash-csv", "href")
        csv_response = page.request.get(f"{server['url']}/admin/billing/dashboard/{href}")
        assert csv_response.status == 200
        assert csv_response.headers["content-disposition"].startswith('attachment; filename="cost-agents-')
        assert csv_response.text().splitlines()[0].startswith("agent,requests,calls")

        # A date filter: one day.
        page.fill("#dash-from", server["yesterday"])
        page.fill("#dash-to", server["yesterday"])
        page.click("#dash-apply")
        page.wait_for_url(f"**from={server['yesterday']}**", timeout=15_000)
        assert charts_ready(page) == 6
        assert page.inner_text("#total-cost") == usd(server["day_total"])
        assert page.inner_text("#total-requests") == f"{server['day_requests']:,}"
        daily = page.locator("#table-daily tbody tr")
        assert daily.count() == 1 and daily.nth(0).locator("td").nth(0).inner_text() == server["yesterday"]
        page.screenshot(path=str(artifact_path("dashboard-filtered.png")), full_page=True)

        # A bad range is explained on the page, with a 400.
        response = page.goto(f"{server['url']}/admin/billing/dashboard/?from=someday")
        assert response.status == 400
        assert "is not a date" in page.inner_text(".dash-errors")
        assert failed == [f"400 {server['url']}/admin/billing/dashboard/?from=someday"]
        assert script_errors == []
    finally:
        context.close()
