"""The cost dashboard (/admin/billing/dashboard/): who may see it, what it shows (per day, agent,
model, key, top consumers, budgets with burn-down and projection), its CSV exports, and a clear
400 for every bad parameter."""

from __future__ import annotations

import csv
import io
import json
import re
import uuid
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from agents.models import Agent, Run
from billing.budgets import budget_create, period_start
from billing.models import Budget, BudgetSpend, UsageRecord
from billing.reports import BudgetRow, Plans, budget_rows, burndown
from billing.rollups import rollup_pending_days
from conftest import PAGE_CSP, csp_directives
from governance.services import api_key_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen_clock")]

UTC = dt_timezone.utc
URL = "/admin/billing/dashboard/"


def at(day: date, hour: int = 0, minute: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute), tzinfo=UTC)


@pytest.fixture
def usage(db):
    """Today and yesterday (rolled up), and 40 days ago (outside the default range): agents
    'writer' and 'coder', keys 'alice' and '=cmd()' (a name a spreadsheet would run)."""
    today = timezone.now().astimezone(UTC).date()
    writer = Agent.objects.create(name="writer", model="openai/gpt-4o-mini")
    coder = Agent.objects.create(name="coder", model="anthropic/claude")
    alice, _ = api_key_create(name="alice <b>", role="client")
    mallory, _ = api_key_create(name="=cmd()", role="client")

    def record(when, agent, key, model, cost, prompt=100, completion=20):
        run = Run.objects.create(agent=agent, api_key=key, transport=Run.Transport.REST, started_at=when,
                                 status=Run.Status.SUCCEEDED)
        UsageRecord.objects.create(created_at=when, agent=agent, api_key=key, model=model, run=run,
                                   prompt_tokens=prompt, completion_tokens=completion, cost_usd=Decimal(cost),
                                   request_id=str(uuid.uuid4()), starts_run=True)

    yesterday = today - timedelta(days=1)
    record(at(yesterday, 9), writer, alice, "openai/gpt-4o-mini", "1.25")
    record(at(yesterday, 10), writer, mallory, "openai/gpt-4o-mini", "0.5")
    record(at(yesterday, 11), coder, mallory, "anthropic/claude", "2")
    record(at(today, 0), coder, alice, "anthropic/claude", "0.125")
    record(at(today - timedelta(days=40), 12), writer, alice, "openai/gpt-4o-mini", "100")
    rollup_pending_days()  # yesterday (and 40 days ago) from rollups, today from the records
    return {"today": today, "yesterday": yesterday, "writer": writer, "coder": coder, "alice": alice,
            "mallory": mallory}


def log_in_staff(client, django_user_model):
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_usagerecord"))
    client.force_login(user)
    return client


@pytest.fixture
def staff(client, django_user_model):
    return log_in_staff(client, django_user_model)


def cell_texts(html: str, table_id: str) -> list[list[str]]:
    table = re.search(rf'<table id="{table_id}"[^>]*>(.*?)</table>', html, re.S).group(1)
    body = table.split("<tbody>")[1]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in rows]


def test_it_shows_the_spend_per_day_agent_model_and_key(staff, usage):
    response = staff.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert reverse("billing_dashboard") == URL
    assert re.search(r'id="total-cost"[^>]*>3\.88<', html)  # 3.875 of the last 30 days, 2 places
    assert re.search(r'id="total-requests"[^>]*>4<', html)

    daily = cell_texts(html, "table-daily")
    assert len(daily) == 30
    assert daily[0] == [usage["today"].isoformat(), "1", "120", "0.125000"]
    assert daily[1] == [usage["yesterday"].isoformat(), "3", "360", "3.750000"]
    assert all(row[3] == "0.000000" for row in daily[2:])
    assert cell_texts(html, "table-agents") == [["coder", "2", "2.125000", "54.8 %"],
                                                ["writer", "2", "1.750000", "45.2 %"]]
    assert [r[0] for r in cell_texts(html, "table-models")] == ["anthropic/claude", "openai/gpt-4o-mini"]
    keys = cell_texts(html, "table-keys")
    assert [(r[0], r[3]) for r in keys] == [(usage["mallory"].prefix, "2.500000"), (usage["alice"].prefix, "1.375000")]
    assert "alice &lt;b&gt;" in html and "alice <b>" not in html
    top = cell_texts(html, "table-top")
    assert [(r[1], r[3], r[8]) for r in top] == [(usage["mallory"].prefix, "coder", "2.000000"),
                                                 (usage["alice"].prefix, "writer", "1.250000"),
                                                 (usage["mallory"].prefix, "writer", "0.500000"),
                                                 (usage["alice"].prefix, "coder", "0.125000")]

    # The charts' data travels as JSON, the code is a static file: no inline script, no CDN.
    charts = json.loads(re.search(r'<script id="dashboard-data" type="application/json">(.*?)</script>',
                                  html, re.S).group(1))
    assert charts["daily"]["cost"][-2:] == ["3.75000000", "0.12500000"]
    assert charts["agents"] == {"labels": ["coder", "writer"], "cost": ["2.12500000", "1.75000000"], "more": 0}
    for tag in re.findall(r"<script[^>]*>", html):
        assert 'type="application/json"' in tag or re.search(r'src="/static/', tag), tag
    assert '/static/vendor/chartjs/chart.umd.min.js' in html and "http://" not in html.split("<body")[0].replace(
        "http://www.w3.org", "")
    assert f"{usage['yesterday']} ".strip() in html


def test_the_dashboard_and_its_400_page_allow_their_own_files_only(staff, usage):
    for response in (staff.get(URL), staff.get(URL, {"from": "someday"})):
        assert response.status_code in (200, 400)
        assert csp_directives(response["Content-Security-Policy"]) == PAGE_CSP


def test_the_chart_library_is_vendored(client, usage):
    from django.contrib.staticfiles import finders

    path = finders.find("vendor/chartjs/chart.umd.min.js")
    assert path and "Chart.js v4" in open(path, encoding="utf-8").read(300)
    assert finders.find("vendor/chartjs/LICENSE.md") and finders.find("billing/dashboard.js")


def test_it_filters_by_agent_model_key_and_range(staff, usage):
    html = staff.get(URL, {"agent": "writer"}).content.decode()
    assert cell_texts(html, "table-agents") == [["writer", "2", "1.750000", "100.0 %"]]

    html = staff.get(URL, {"key": usage["alice"].prefix, "model": "anthropic/claude"}).content.decode()
    assert re.search(r'id="total-cost"[^>]*>0\.125000<', html)

    day = usage["yesterday"].isoformat()
    html = staff.get(URL, {"from": day, "to": day}).content.decode()
    assert cell_texts(html, "table-daily") == [[day, "3", "360", "3.750000"]]

    old = (usage["today"] - timedelta(days=40)).isoformat()
    html = staff.get(URL, {"from": old, "to": usage["today"].isoformat()}).content.decode()
    assert re.search(r'id="total-cost"[^>]*>103\.88<', html)

    response = staff.get(URL, {"agent": "nobody"})
    assert response.status_code == 200
    html = response.content.decode()
    assert "No agent is named &#x27;nobody&#x27;." in html
    assert re.search(r'id="total-cost"[^>]*>0\.000000<', html)


@pytest.mark.parametrize("params, reason", [
    ({"from": "yesterday"}, "is not a date"),
    ({"to": "2025-02-30"}, "is not a date"),
    ({"from": "2025-03-10", "to": "2025-03-01"}, "is after"),
    ({"from": "2020-01-01", "to": "2025-01-01"}, "at most 731"),
    ({"from": "1066-10-14"}, "out of range"),
    ({"agent": "x" * 101}, "longer than 100"),
    ({"model": "a\x01b"}, "control characters"),  # NUL is refused before any view (test_endpoints)
    ({"format": "pdf"}, "must be html or csv"),
])
def test_bad_parameters_get_a_400_page_that_says_why(staff, usage, params, reason):
    response = staff.get(URL, params)
    assert response.status_code == 400
    html = response.content.decode()
    assert reason in html
    assert 'role="alert"' in html and 'id="dashboard-data"' not in html
    assert '<form class="dash-filters"' in html  # the form stays, to correct the range


def test_bad_csv_parameters_get_a_400_text(staff, usage):
    for params in ({"format": "csv"}, {"format": "csv", "section": "everything"},
                   {"format": "csv", "section": "daily", "from": "nope"}):
        response = staff.get(URL, params)
        assert response.status_code == 400
        assert response["Content-Type"].startswith("text/plain")
        assert response.content.startswith(b"Bad request:")


def test_it_exports_each_table_as_csv(staff, usage):
    today = usage["today"].isoformat()
    start = (usage["today"] - timedelta(days=29)).isoformat()
    expected_headers = {
        "daily": ["day", "requests", "calls", "prompt_tokens", "completion_tokens", "cost_usd"],
        "agents": ["agent", "requests", "calls", "prompt_tokens", "completion_tokens", "cost_usd", "share_pct"],
        "models": ["model", "requests", "calls", "prompt_tokens", "completion_tokens", "cost_usd", "share_pct"],
        "keys": ["key", "key_name", "requests", "calls", "prompt_tokens", "completion_tokens", "cost_usd",
                 "share_pct"],
        "top": ["key", "key_name", "agent", "requests", "calls", "prompt_tokens", "completion_tokens", "cost_usd",
                "share_pct"],
        "budgets": ["id", "budget", "scope", "agent", "key", "period", "hard", "period_start", "period_end",
                    "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "used_pct", "projected_usd",
                    "projected_pct", "status"],
        "burndown": ["budget_id", "budget", "point", "cumulative_usd", "projected_usd", "limit_usd"],
    }
    tables = {}
    for section, header in expected_headers.items():
        response = staff.get(URL, {"format": "csv", "section": section})
        assert response.status_code == 200
        assert response["Content-Type"] == "text/csv; charset=utf-8"
        assert response["Content-Disposition"] == f'attachment; filename="cost-{section}-{start}-to-{today}.csv"'
        rows = list(csv.reader(io.StringIO(response.content.decode())))
        assert rows[0] == header, section
        tables[section] = rows[1:]
    assert len(tables["daily"]) == 30 and tables["daily"][-1] == [today, "1", "1", "100", "20", "0.12500000"]
    assert tables["agents"][0] == ["coder", "2", "2", "200", "40", "2.12500000", "54.8"]
    # A name starting with "=" is written as text, not as a formula.
    names = {row[0]: row[1] for row in tables["keys"]}
    assert names[usage["mallory"].prefix] == "'=cmd()"

    filtered = staff.get(URL, {"format": "csv", "section": "agents", "agent": "coder"})
    assert [row[0] for row in csv.reader(io.StringIO(filtered.content.decode()))][1:] == ["coder"]


def test_it_shows_each_budget_with_its_projection_and_burn_down(staff, usage):
    monthly = budget_create(scope="global", period="month", limit_usd=Decimal("10"), name="Everything")
    daily = budget_create(scope="agent", agent_name="coder", period="day", limit_usd=Decimal("1"), hard=False)
    total = budget_create(scope="key", key_prefix=usage["alice"].prefix, period="total", limit_usd=Decimal("500"))
    now = timezone.now()
    BudgetSpend.objects.create(budget=monthly, period_start=period_start("month", now), spent_usd=Decimal("4"),
                               reserved_usd=Decimal("0.5"))
    BudgetSpend.objects.create(budget=daily, period_start=period_start("day", now), spent_usd=Decimal("1.5"))

    response = staff.get(URL)
    html = response.content.decode()
    rows = {r[0]: r for r in cell_texts(html, "table-budgets")}
    assert set(rows) == {"Everything hard", "agent coder", f"key {usage['alice'].prefix} hard"}
    everything = rows["Everything hard"]
    assert everything[3:6] == ["10.000000", "4.000000", "0.500000"]
    assert everything[6] == "40.0 %"
    assert rows["agent coder"][8] == "Exceeded"
    assert rows[f"key {usage['alice'].prefix} hard"][7] == "—"  # no end, no projection

    charts = json.loads(re.search(r'id="dashboard-data" type="application/json">(.*?)</script>', html, re.S)[1])
    burndowns = {b["label"]: b for b in charts["burndowns"]}
    assert len(burndowns["agent coder"]["labels"]) == 24  # a daily budget burns down per hour
    month = burndowns["Everything"]
    assert month["limit"] == "10.00000000" and month["labels"][0].endswith("-01")
    spent_now = [v for v in month["cumulative"] if v is not None][-1]
    # The usage in the period so far (yesterday's only counts if it is this month).
    this_month = Decimal("0.125") + (Decimal("3.75") if usage["yesterday"].month == usage["today"].month else 0)
    assert Decimal(spent_now) == this_month
    assert Decimal(month["projection"][-1]) > Decimal("4")  # spent / elapsed fraction, at the period's end
    assert 'id="burndown-{}"'.format(monthly.id) in html


def test_each_budget_period_shows_its_first_and_last_day(client, django_user_model):
    # The last second of a Sunday that ends February (and the week): each period ends tonight.
    with time_machine.travel(datetime(2027, 2, 28, 23, 59, 59, tzinfo=UTC), tick=False):
        staff = log_in_staff(client, django_user_model)
        for period in ("month", "week", "day"):
            budget_create(scope="global", period=period, limit_usd=Decimal("10"), name=period)
        budget_create(scope="global", period="total", limit_usd=Decimal("10"), name="total")
        response = staff.get(URL)
        rows = {r[0]: r for r in cell_texts(response.content.decode(), "table-budgets")}
        [csv_row] = [r for r in csv.DictReader(io.StringIO(staff.get(URL, {"format": "csv", "section": "budgets"})
                                                           .content.decode())) if r["period"] == "day"]

    # Both days included (period_end is the exclusive midnight after the last day).
    assert rows["month hard"][2] == "month2027-02-01 → 2027-02-28"
    assert rows["week hard"][2] == "week2027-02-22 → 2027-02-28"
    assert rows["day hard"][2] == "day2027-02-28"
    assert rows["total hard"][2] == "total2000-01-01"
    assert (csv_row["period_start"], csv_row["period_end"]) == ("2027-02-28T00:00:00+00:00",
                                                                "2027-03-01T00:00:00+00:00")


def test_the_projection_is_spent_over_the_elapsed_fraction(usage):
    budget = budget_create(scope="global", period="month", limit_usd=Decimal("100"))
    start = datetime(2025, 4, 1, tzinfo=UTC)  # 30 days
    row = BudgetRow(budget=budget, period_start=start, period_end=datetime(2025, 5, 1, tzinfo=UTC),
                    now=start + timedelta(days=6), spent_usd=Decimal("30"), reserved_usd=Decimal("0"),
                    remaining_usd=Decimal("70"))
    assert row.elapsed == pytest.approx(0.2)
    assert row.projected_usd == Decimal("150.00000000")
    assert row.used_pct == Decimal("30") and row.projected_pct == Decimal("150")
    assert row.status == "at_risk"
    assert row.as_dict()["projected_pct"] == "150.0"
    points = burndown(row, plans=Plans())
    assert len(points["labels"]) == 30 and points["projection"][5] == "30.00000000"
    assert points["projection"][-1] == "150.00000000"
    assert points["cumulative"][6] is not None and points["cumulative"][7] is None  # the future is empty
    assert [r.budget.id for r in budget_rows(period="week")] == []


def test_it_keeps_the_page_to_staff_who_may_view_usage(client, usage, django_user_model):
    response = client.get(URL)
    assert response.status_code == 302
    assert response["Location"] == f"/admin/login/?next={URL}"

    user = django_user_model.objects.create_user("plain-staff", password="pw", is_staff=True)
    client.force_login(user)
    assert client.get(URL).status_code == 403

    superuser = get_user_model().objects.create_superuser("root", password="pw")
    client.force_login(superuser)
    assert client.get(URL).status_code == 200
    assert client.post(URL, {"from": "2025-01-01"}).status_code == 405  # a page to read, nothing to post


def test_a_budget_without_usage_or_limit_renders(staff, db):
    agent = Agent.objects.create(name="lonely", model="local/demo")
    budget_create(scope="agent", agent_name="lonely", period="week", limit_usd=Decimal("0"))
    response = staff.get(URL)
    assert response.status_code == 200
    html = response.content.decode()
    assert cell_texts(html, "table-agents") == [["No usage."]]
    rows = cell_texts(html, "table-budgets")
    assert rows[0][0] == "agent lonely hard" and rows[0][6] == "—" and rows[0][8] == "Exceeded"
    assert Budget.objects.filter(agent=agent).count() == 1
