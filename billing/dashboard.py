"""The cost dashboard: GET /admin/billing/dashboard/ (URL name "billing_dashboard"), for staff
with the "view usage record" permission, wrapped in admin.site.admin_view (login redirect).

    ?from=&to=             ISO dates, both included (default: the last 30 days, UTC, today included)
    ?agent=&model=&key=    only this agent (name), model, API key (prefix)
    ?format=csv&section=   one table as CSV: daily, agents, models, keys, top, budgets, burndown

Spend per day, by agent, by model and by key, the top consumers (key × agent) and every enabled
budget's current period with its burn-down and projected end-of-period spend. Each chart has
its table beside it; the tables are rendered here, the charts by static/billing/dashboard.js
(Chart.js vendored under static/vendor/) from data passed with json_script, so the page needs
no inline script (its Content-Security-Policy, agentplatform.csp, allows none). Usage is read
through billing.rollups (daily rollups + today's records, exact); budgets through
billing.reports. Bad parameters get a 400 with the reasons on the page (or as
text for CSV), never a 500.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any, Mapping

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.dateparse import parse_date
from django.utils.http import urlencode

from agentplatform.methods import http_methods

from agentplatform.csp import page_csp

from .models import ModelPrice
from .reports import Plans, budget_rows, burndown, money, percent, to_csv

SECTIONS = ("daily", "agents", "models", "keys", "top", "budgets", "burndown")
DEFAULT_DAYS = 30
MAX_DAYS = 731
TOP_CONSUMERS = 10
TABLE_ROWS = 50  # longer tables are cut on the page (the CSV has every row)
CHART_BARS = 15
MAX_BURNDOWNS = 24
PERMISSION = "billing.view_usagerecord"
STATUS_LABELS = {"ok": "OK", "at_risk": "At risk", "exceeded": "Exceeded"}
_LIMITS = {"agent": 100, "model": 200, "key": 64}


@dataclass(frozen=True)
class DashboardQuery:
    date_from: date
    date_to: date  # included
    agent: str = ""
    model: str = ""
    key: str = ""
    format: str = "html"
    section: str = ""

    @property
    def start(self) -> datetime:
        return datetime(self.date_from.year, self.date_from.month, self.date_from.day, tzinfo=dt_timezone.utc)

    @property
    def end(self) -> datetime:
        return datetime(self.date_to.year, self.date_to.month, self.date_to.day, tzinfo=dt_timezone.utc) \
            + timedelta(days=1)

    @property
    def days(self) -> int:
        return (self.date_to - self.date_from).days + 1

    def filters(self) -> dict:
        return {k: v for k, v in (("agent", self.agent), ("model", self.model), ("key", self.key)) if v}

    def params(self, **extra: str) -> str:
        """This query as URL parameters (for the CSV links)."""
        base = {"from": self.date_from.isoformat(), "to": self.date_to.isoformat(), **self.filters(), **extra}
        return urlencode(base)


def parse_query(params: Mapping[str, str], *, today: date) -> tuple[DashboardQuery | None, list[str]]:
    """The dashboard's parameters, validated: (query, []) or (None, reasons)."""
    errors: list[str] = []
    dates: dict[str, date | None] = {}
    for name in ("from", "to"):
        text = (params.get(name) or "").strip()
        dates[name] = None
        if not text:
            continue
        try:
            value = parse_date(text)
        except ValueError:
            value = None
        if value is None:
            errors.append(f"`{name}`: {text[:40]!r} is not a date; use YYYY-MM-DD.")
        elif not 2000 <= value.year <= 2999:
            errors.append(f"`{name}`: {value.isoformat()} is out of range (years 2000 to 2999).")
        else:
            dates[name] = value
    date_to = dates["to"] or today
    date_from = dates["from"] or date_to - timedelta(days=DEFAULT_DAYS - 1)
    if not errors:
        if date_from > date_to:
            errors.append(f"`from` ({date_from}) is after `to` ({date_to}).")
        elif (date_to - date_from).days + 1 > MAX_DAYS:
            errors.append(f"The range spans {(date_to - date_from).days + 1} days; at most {MAX_DAYS}.")
    texts = {}
    for name, limit in _LIMITS.items():
        value = (params.get(name) or "").strip()
        if len(value) > limit:
            errors.append(f"`{name}` is longer than {limit} characters.")
        elif any(ord(c) < 32 or ord(c) == 127 for c in value):
            errors.append(f"`{name}` contains control characters.")
        texts[name] = value
    output = (params.get("format") or "html").strip().lower()
    section = (params.get("section") or "").strip().lower()
    if output not in ("html", "csv"):
        errors.append(f"`format` must be html or csv, not {output[:20]!r}.")
    elif output == "csv" and section not in SECTIONS:
        errors.append(f"`section` must be one of {', '.join(SECTIONS)} for CSV.")
    if errors:
        return None, errors
    return DashboardQuery(date_from=date_from, date_to=date_to, format=output, section=section, **texts), []


# --- the data -----------------------------------------------------------------------------------


def _with_share(groups: list[dict], total: Decimal) -> list[dict]:
    for g in groups:
        g["share_pct"] = percent(g["cost_usd"] * 100 / total) if total else None
    return groups


def _by_cost(groups: list[dict]) -> list[dict]:
    return sorted(groups, key=lambda g: (-g["cost_usd"], str(g)))


def dashboard_data(query: DashboardQuery, *, now: datetime | None = None) -> dict:
    """Everything the page shows (money as Decimal; see dashboard_json for the charts)."""
    from agents.models import Agent
    from governance.models import ApiKey

    now = now or timezone.now()
    plans = Plans()
    usage = plans.query(query.start, query.end, query.filters())
    notices = []
    if query.agent and not Agent.objects.filter(name=query.agent).exists():
        notices.append(f"No agent is named {query.agent!r}.")
    if query.key and not ApiKey.objects.filter(prefix=query.key).exists():
        notices.append(f"No API key has the prefix {query.key!r}.")

    daily = usage.summary("day")
    total = daily["total"]
    by_day = {g["day"]: g for g in daily["groups"]}
    days = []
    for offset in range(query.days):
        day = (query.date_from + timedelta(days=offset)).isoformat()
        row = by_day.get(day) or {"day": day, "requests": 0, "calls": 0, "prompt_tokens": 0,
                                  "completion_tokens": 0, "cost_usd": Decimal("0")}
        days.append(row)

    agents = _with_share(_by_cost(usage.summary("agent")["groups"]), total["cost_usd"])
    models = _with_share(_by_cost(usage.summary("model")["groups"]), total["cost_usd"])
    keys = _with_share(_by_cost(usage.summary("key")["groups"]), total["cost_usd"])
    top = _with_share(_by_cost(usage.summary(("key", "agent"))["groups"])[:TOP_CONSUMERS], total["cost_usd"])
    prefixes = {g["key"] for g in keys if g["key"]}
    names = dict(ApiKey.objects.filter(prefix__in=prefixes).values_list("prefix", "name")) if prefixes else {}
    for g in (*keys, *top):
        g["key_name"] = names.get(g["key"], "")

    budgets = []
    for index, row in enumerate(budget_rows(now=now)):
        item = {"row": row, **row.as_dict(), "chart_id": f"burndown-{row.budget.id}", "burndown": None}
        item["status_label"] = STATUS_LABELS[row.status]
        if index < MAX_BURNDOWNS:
            item["burndown"] = burndown(row, plans=plans, range_start=query.start, range_end=query.end)
            item["burndown_rows"] = list(zip(item["burndown"]["labels"], item["burndown"]["cumulative"],
                                             item["burndown"]["projection"] or [None] * len(item["burndown"]["labels"])))
        budgets.append(item)

    plan = usage.plan
    return {"query": query, "now": now, "total": total, "days": days, "agents": agents, "models": models,
            "keys": keys, "top": top, "budgets": budgets, "notices": notices,
            "source": {"rolled_days": plan.rolled_days, "stale_days": [d.isoformat() for d in plan.stale],
                       "raw_intervals": len(plan.raw)}}


def dashboard_json(data: dict) -> dict:
    """The charts' data (for json_script): labels and decimal strings."""
    def bars(groups: list[dict], label) -> dict:
        shown = groups[:CHART_BARS]
        return {"labels": [label(g) for g in shown], "cost": [money(g["cost_usd"]) for g in shown],
                "more": max(len(groups) - CHART_BARS, 0)}

    return {
        "daily": {"labels": [d["day"] for d in data["days"]], "cost": [money(d["cost_usd"]) for d in data["days"]],
                  "requests": [d["requests"] for d in data["days"]]},
        "agents": bars(data["agents"], lambda g: g["agent"] or "(deleted agent)"),
        "models": bars(data["models"], lambda g: g["model"]),
        "keys": bars(data["keys"], lambda g: g["key"] or "(no key)"),
        "burndowns": [{"id": b["chart_id"], "label": b["budget"], **b["burndown"]}
                      for b in data["budgets"] if b["burndown"]],
    }


# --- CSV ------------------------------------------------------------------------------------------

_USAGE_COLUMNS = ("requests", "calls", "prompt_tokens", "completion_tokens", "cost_usd")


def _usage_cells(g: dict) -> list:
    return [g["requests"], g["calls"], g["prompt_tokens"], g["completion_tokens"], money(g["cost_usd"])]


def dashboard_csv(data: dict, section: str) -> str:
    if section == "daily":
        return to_csv(("day", *_USAGE_COLUMNS), ([d["day"], *_usage_cells(d)] for d in data["days"]))
    if section in ("agents", "models"):
        name = section[:-1]
        return to_csv((name, *_USAGE_COLUMNS, "share_pct"),
                      ([g[name], *_usage_cells(g), g["share_pct"]] for g in data[section]))
    if section == "keys":
        return to_csv(("key", "key_name", *_USAGE_COLUMNS, "share_pct"),
                      ([g["key"], g["key_name"], *_usage_cells(g), g["share_pct"]] for g in data["keys"]))
    if section == "top":
        return to_csv(("key", "key_name", "agent", *_USAGE_COLUMNS, "share_pct"),
                      ([g["key"], g["key_name"], g["agent"], *_usage_cells(g), g["share_pct"]] for g in data["top"]))
    if section == "budgets":
        columns = ("id", "budget", "scope", "agent", "key", "period", "hard", "period_start", "period_end",
                   "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "used_pct", "projected_usd",
                   "projected_pct", "status")
        return to_csv(columns, ([b[c] for c in columns] for b in data["budgets"]))
    rows = []
    for b in data["budgets"]:
        if b["burndown"]:
            rows.extend([b["id"], b["budget"], point, cumulative, projected, b["limit_usd"]]
                        for point, cumulative, projected in b["burndown_rows"])
    return to_csv(("budget_id", "budget", "point", "cumulative_usd", "projected_usd", "limit_usd"), rows)


# --- the view -----------------------------------------------------------------------------------


def _page(request: HttpRequest, context: dict, status: int = 200) -> TemplateResponse:
    from agents.models import Agent
    from governance.models import ApiKey

    base = {**admin.site.each_context(request), "title": "Cost dashboard",
            "agent_names": list(Agent.objects.order_by("name").values_list("name", flat=True)[:500]),
            "key_options": list(ApiKey.objects.order_by("name").values_list("prefix", "name")[:500]),
            "model_names": sorted(set(ModelPrice.objects.values_list("model", flat=True).distinct()[:500]))}
    return TemplateResponse(request, "admin/billing/dashboard.html", {**base, **context}, status=status)


@http_methods("GET")
@page_csp
def dashboard_view(request: HttpRequest) -> HttpResponse:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied("The cost dashboard needs the permission to view usage records.")
    # One reading of the clock: the default range's last day and the budgets' periods are then
    # the same day's, even for a page asked for at 23:59:59.999.
    now = timezone.now()
    today = now.astimezone(dt_timezone.utc).date()
    query, errors = parse_query(request.GET, today=today)
    if query is None:
        if (request.GET.get("format") or "").strip().lower() == "csv":
            return HttpResponse("Bad request:\n" + "\n".join(errors) + "\n", status=400,
                                content_type="text/plain; charset=utf-8")
        form = {k: (request.GET.get(k) or "")[:200] for k in ("from", "to", "agent", "model", "key")}
        return _page(request, {"errors": errors, "form": form}, status=400)
    data = dashboard_data(query, now=now)
    if query.format == "csv":
        response = HttpResponse(dashboard_csv(data, query.section), content_type="text/csv; charset=utf-8")
        filename = f"cost-{query.section}-{query.date_from}-to-{query.date_to}.csv"
        response["Content-Disposition"] = f'attachment; filename="{filename}"'
        return response
    form = {"from": query.date_from.isoformat(), "to": query.date_to.isoformat(), **query.filters()}
    return _page(request, {"data": data, "form": form, "charts": dashboard_json(data),
                           "csv": {s: "?" + query.params(format="csv", section=s) for s in SECTIONS},
                           "ranges": _quick_ranges(query, today)})


def _quick_ranges(query: DashboardQuery, today: date) -> list[dict]:
    out = []
    for days in (7, 30, 90):
        q = DashboardQuery(date_from=today - timedelta(days=days - 1), date_to=today, agent=query.agent,
                           model=query.model, key=query.key)
        out.append({"label": f"Last {days} days", "params": "?" + q.params(),
                    "active": query.date_to == today and query.days == days})
    return out


def dashboard_data_for(params: Mapping[str, Any], *, now: datetime | None = None) -> dict:
    """dashboard_data from raw parameters (the benchmark and tests); ValueError on bad ones."""
    now = now or timezone.now()
    query, errors = parse_query(params, today=now.astimezone(dt_timezone.utc).date())
    if query is None:
        raise ValueError("; ".join(errors))
    return dashboard_data(query, now=now)
