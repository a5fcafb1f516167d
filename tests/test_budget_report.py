"""`manage.py budget_report`: spend against each budget (% used, projection) as an aligned
table, CSV or JSON; per-group spend over a range; --output written atomically, never clobbered
silently; a clear CommandError for bad arguments."""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
import time_machine
from django.core.management import CommandError, call_command
from django.utils import timezone

from agents.models import Agent, Run
from billing.budgets import budget_create, period_start
from billing.models import BudgetSpend, UsageRecord
from billing.rollups import rollup_pending_days
from governance.services import api_key_create

pytestmark = pytest.mark.django_db

UTC = dt_timezone.utc


# The figures (elapsed share of the period, projection, "yesterday" in the same month) depend
# on the date: every test here runs at this instant, a Wednesday mid-month, 55 % of the way
# through June: 16.6 of its 30 days elapsed.
NOW = datetime(2026, 6, 17, 14, 24, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _frozen_clock():
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def budgets(db):
    """A global monthly budget (4 of 10 USD spent), a soft weekly one for agent 'coder', a daily
    one for key 'alice'; usage yesterday and today."""
    now = timezone.now()
    today = now.astimezone(UTC).date()
    writer = Agent.objects.create(name="writer", model="m/a")
    coder = Agent.objects.create(name="coder", model="m/b")
    alice, _ = api_key_create(name="alice", role="client")
    bob, _ = api_key_create(name="bob", role="client")
    for day, agent, key, model, cost in [(today - timedelta(days=1), writer, alice, "m/a", "1.5"),
                                         (today - timedelta(days=1), coder, bob, "m/b", "0.25"),
                                         (today, coder, alice, "m/b", "0.75"),
                                         (today, writer, bob, "m/a", "0.125")]:
        when = datetime.combine(day, time(0), tzinfo=UTC)
        run = Run.objects.create(agent=agent, api_key=key, transport=Run.Transport.REST, started_at=when)
        UsageRecord.objects.create(created_at=when, agent=agent, api_key=key, model=model, run=run,
                                   prompt_tokens=1000, completion_tokens=100, cost_usd=Decimal(cost),
                                   request_id=str(uuid.uuid4()), starts_run=True)
    rollup_pending_days()
    monthly = budget_create(scope="global", period="month", limit_usd=Decimal("10"), name="All")
    weekly = budget_create(scope="agent", agent_name="coder", period="week", limit_usd=Decimal("2"), hard=False)
    daily = budget_create(scope="key", key_prefix=alice.prefix, period="day", limit_usd=Decimal("1"))
    BudgetSpend.objects.create(budget=monthly, period_start=period_start("month", now), spent_usd=Decimal("4"),
                               reserved_usd=Decimal("0.5"))
    BudgetSpend.objects.create(budget=daily, period_start=period_start("day", now), spent_usd=Decimal("0.75"))
    return {"monthly": monthly, "weekly": weekly, "daily": daily, "alice": alice, "bob": bob, "today": today}


def report(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("budget_report", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_it_reports_json_with_percent_used_and_projection(budgets):
    out, err = report("--format", "json")
    body = json.loads(out)  # stdout is the report alone; progress went to stderr
    assert "3 enabled budgets" in err
    rows = {b["id"]: b for b in body["budgets"]}
    monthly = rows[budgets["monthly"].id]
    assert monthly["budget"] == "All" and monthly["scope"] == "global" and monthly["period"] == "month"
    assert (monthly["limit_usd"], monthly["spent_usd"], monthly["reserved_usd"], monthly["remaining_usd"]) == \
        ("10.00000000", "4.00000000", "0.50000000", "5.50000000")
    assert monthly["used_pct"] == "40.0"
    # 16 days 14.4 hours of June's 30 days: 55.3 % elapsed; 4 USD spent -> 7.23 USD at the end.
    assert monthly["elapsed_pct"] == "55.3"
    assert float(monthly["projected_usd"]) == pytest.approx(4 / (16.6 / 30), rel=1e-6)
    assert rows[budgets["weekly"].id]["spent_usd"] == "0.00000000"
    assert rows[budgets["weekly"].id]["status"] == "ok" and rows[budgets["weekly"].id]["hard"] is False
    assert rows[budgets["daily"].id]["used_pct"] == "75.0"
    assert body["group_by"] is None and all(b["groups"] is None for b in body["budgets"])


def test_it_prints_an_aligned_table(budgets):
    out, _ = report()
    lines = out.splitlines()
    assert lines[0].startswith("Budgets at ")
    header, rows = lines[1], lines[2:]
    assert len(rows) == 3
    # Right-aligned money columns end where their header ends.
    spent_end = header.index("Spent USD") + len("Spent USD")
    by_name = {row.split("  ")[1].strip(): row for row in rows}
    assert by_name["All"][:spent_end].endswith("4.000000")
    assert by_name["agent coder"][:spent_end].endswith("0.000000")
    assert "40.0 %" in by_name["All"] and "75.0 %" in by_name[f"key {budgets['alice'].prefix}"]


def test_it_writes_csv_rows_per_budget_and_group(budgets):
    yesterday = (budgets["today"] - timedelta(days=1)).isoformat()
    out, err = report("--format", "csv", "--group-by", "agent", "--from", yesterday, "--to",
                      budgets["today"].isoformat())
    rows = list(csv.DictReader(io.StringIO(out)))
    assert "[1/3]" in err and "[3/3]" in err
    everything = [r for r in rows if r["id"] == str(budgets["monthly"].id)]
    assert [(r["group"], r["cost_usd"], r["requests"]) for r in everything] == [
        ("writer", "1.62500000", "2"), ("coder", "1.00000000", "2")]
    assert everything[0]["range_cost_usd"] == "2.62500000" and everything[0]["used_pct"] == "40.0"
    coder = [r for r in rows if r["id"] == str(budgets["weekly"].id)]
    assert [(r["group"], r["cost_usd"]) for r in coder] == [("coder", "1.00000000")]
    alice = [r for r in rows if r["id"] == str(budgets["daily"].id)]
    assert {r["group"] for r in alice} == {"writer", "coder"}


def test_it_groups_by_day_over_the_current_period_by_default(budgets):
    out, _ = report("--format", "json", "--group-by", "day", "--period", "day")
    body = json.loads(out)
    assert [b["id"] for b in body["budgets"]] == [budgets["daily"].id]
    groups = body["budgets"][0]["groups"]
    assert groups == [{"group": budgets["today"].isoformat(), "requests": 1, "calls": 1, "prompt_tokens": 1000,
                       "completion_tokens": 100, "cost_usd": "0.75000000"}]

    out, _ = report("--group-by", "model")
    assert "All (#%d): spend by model" % budgets["monthly"].id in out
    assert "m/a" in out and "m/b" in out


def test_from_and_to_alone_add_the_spend_in_the_range(budgets):
    day = (budgets["today"] - timedelta(days=1)).isoformat()
    out, _ = report("--format", "json", "--from", day, "--to", day)
    rows = {b["id"]: b for b in json.loads(out)["budgets"]}
    assert rows[budgets["monthly"].id]["range"]["cost_usd"] == "1.75000000"
    assert rows[budgets["daily"].id]["range"]["cost_usd"] == "1.50000000"
    table, _ = report("--from", day, "--to", day)
    assert "In range USD" in table.splitlines()[1]


def test_it_writes_the_output_file_atomically_and_never_clobbers_silently(budgets, tmp_path):
    target = tmp_path / "report.json"
    out, err = report("--format", "json", "--output", str(target))
    assert out == "" and f"Wrote {target}" in err
    assert len(json.loads(target.read_text())["budgets"]) == 3
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left behind

    with pytest.raises(CommandError, match="exists; pass --force"):
        report("--format", "csv", "--output", str(target))
    assert json.loads(target.read_text())  # untouched

    report("--format", "csv", "--output", str(target), "--force")
    assert target.read_text().startswith("id,budget,scope,")
    with pytest.raises(CommandError, match="does not exist"):
        report("--output", str(tmp_path / "missing" / "r.txt"))
    with pytest.raises(CommandError, match="is a directory"):
        report("--output", str(tmp_path), "--force")


@pytest.mark.parametrize("args, message", [
    (["--from", "last week"], "is not an ISO date"),
    (["--to", "2025-02-30"], "is not an ISO date"),
    (["--from", "2025-03-10", "--to", "2025-03-01"], "must be before"),
    (["--from", "1999-12-31"], "out of range"),
    (["--group-by", "week"], "invalid choice"),
    (["--format", "xml"], "invalid choice"),
    (["--period", "year"], "invalid choice"),
])
def test_bad_arguments_are_a_clear_command_error(budgets, args, message):
    with pytest.raises(CommandError, match=message):
        report(*args)


def test_it_says_so_when_there_are_no_budgets(db):
    out, _ = report()
    assert "No enabled budgets." in out
    assert json.loads(report("--format", "json", "-v", "0")[0])["budgets"] == []
    _, err = report("-v", "0")
    assert err == ""
