"""`manage.py budget_report [--period day|week|month|total] [--from DATE] [--to DATE]
[--group-by agent|model|key|day] [--format table|csv|json] [--output FILE [--force]]`.

Every enabled budget (of one period kind with --period) in its current period (UTC): limit,
spent, reserved, remaining, % used (spent / limit) and the projected end-of-period spend
(linear: spent / elapsed fraction of the period; none for `total` budgets), from
billing.reports, the same numbers as the cost dashboard.

--group-by adds each budget's spend in its scope per agent, model, key or day over --from/--to
(default: the budget's current period so far); --from/--to alone add the spend in that range.
Dates are ISO (YYYY-MM-DD, `--to` included) or datetimes (naive = UTC).

Formats: `table` (aligned text for people), `csv` (one row per budget, or per budget and group,
money with 8 places), `json` (one object). The report goes to stdout, or to FILE: written to a
temporary file beside it and renamed into place (never half-written); an existing FILE is
refused unless --force. Progress goes to stderr (silence it with -v 0).
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime

from billing.models import Budget
from billing.reports import Plans, budget_filters, budget_rows, money, to_csv
from billing.rollups import DIMENSIONS, METRICS

BUDGET_COLUMNS = ("id", "budget", "scope", "agent", "key", "period", "hard", "period_start", "period_end",
                  "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "used_pct", "projected_usd",
                  "projected_pct", "status")


def _moment(text: str, *, end: bool, option: str) -> datetime:
    """An ISO date (its midnight UTC; for --to the next midnight, so the day is included) or an
    ISO datetime (naive means UTC)."""
    text = text.strip()
    moment = None
    try:
        if "T" in text or " " in text:
            moment = parse_datetime(text)
        else:
            day = parse_date(text)
            if day is not None:
                moment = datetime.combine(day, time.min, tzinfo=dt_timezone.utc) + timedelta(days=1 if end else 0)
    except (ValueError, OverflowError):
        moment = None
    if moment is None:
        raise CommandError(f"{option} {text!r} is not an ISO date (2025-03-31) or datetime (2025-03-31T12:00:00Z).")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt_timezone.utc)
    if not 2000 <= moment.year <= 2999:
        raise CommandError(f"{option} {text!r} is out of range (years 2000 to 2999).")
    return moment


class Command(BaseCommand):
    help = ("Spend against each enabled budget in its current period: limit, spent, reserved, % used and the "
            "projected end-of-period spend; optionally the spend per agent, model, key or day.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--period", choices=Budget.Period.values, default=None,
                            help="Only budgets with this period (default: all).")
        parser.add_argument("--from", dest="date_from", default=None, metavar="DATE",
                            help="Start of the range of the per-group spend (default: each budget's period start).")
        parser.add_argument("--to", dest="date_to", default=None, metavar="DATE",
                            help="End of that range, a date included (default: now).")
        parser.add_argument("--group-by", choices=[d for d in ("agent", "model", "key", "day") if d in DIMENSIONS],
                            default=None, help="Break each budget's spend down by this.")
        parser.add_argument("--format", choices=["table", "csv", "json"], default="table",
                            help="table (aligned text, default), csv or json.")
        parser.add_argument("--output", default=None, metavar="FILE",
                            help="Write the report to FILE (atomically) instead of stdout.")
        parser.add_argument("--force", action="store_true", help="Replace FILE if it exists.")

    def handle(self, *args: Any, period: str | None, date_from: str | None, date_to: str | None,
               group_by: str | None, output: str | None, force: bool, **options: Any) -> None:
        fmt = options["format"]
        verbose = options.get("verbosity", 1) >= 1
        now = timezone.now()
        start = _moment(date_from, end=False, option="--from") if date_from else None
        end = _moment(date_to, end=True, option="--to") if date_to else None
        if start and end and start >= end:
            raise CommandError(f"--from ({date_from}) must be before --to ({date_to}).")
        if output is not None:
            if os.path.isdir(output):
                raise CommandError(f"--output {output} is a directory.")
            if os.path.lexists(output) and not force:
                raise CommandError(f"{output} exists; pass --force to replace it.")
            folder = os.path.dirname(os.path.abspath(output))
            if not os.path.isdir(folder):
                raise CommandError(f"--output: the folder {folder} does not exist.")

        rows = budget_rows(now=now, period=period)
        ranged = bool(group_by or start or end)
        if verbose:
            what = f" of period {period}" if period else ""
            self.stderr.write(f"budget_report: {len(rows)} enabled budget{'s' if len(rows) != 1 else ''}{what}"
                              + (f", spend by {group_by}" if group_by else "") + ".")
        plans = Plans()
        report = []
        for index, row in enumerate(rows, 1):
            item = {**row.as_dict(), "groups": None, "range": None}
            if ranged:
                lo = start or row.period_start
                hi = end or now
                if lo >= hi:
                    item["range"] = {"from": lo.isoformat(), "to": hi.isoformat(), "cost_usd": money(0)}
                    item["groups"] = [] if group_by else None
                else:
                    query = plans.query(lo, hi, budget_filters(row.budget))
                    summary = query.summary(group_by)
                    item["range"] = {"from": lo.isoformat(), "to": hi.isoformat(),
                                     "cost_usd": money(summary["total"]["cost_usd"])}
                    if group_by:
                        item["groups"] = [{"group": g[group_by], **_metrics(g)}
                                          for g in sorted(summary["groups"], key=_group_order(group_by))]
                if verbose and group_by:
                    self.stderr.write(f"  [{index}/{len(rows)}] {row.label}: "
                                      f"{len(item['groups'] or [])} group{'s' if len(item['groups'] or []) != 1 else ''}")
            report.append(item)

        text = self._render(fmt, report, now=now, period=period, group_by=group_by, start=start, end=end)
        if output is None:
            self.stdout.write(text, ending="")
            return
        self._write(output, text)
        if verbose:
            self.stderr.write(f"Wrote {output} ({len(report)} budget{'s' if len(report) != 1 else ''}, {fmt}).")

    # --- formats ---------------------------------------------------------------------------

    def _render(self, fmt: str, report: list[dict], *, now: datetime, period: str | None, group_by: str | None,
                start: datetime | None, end: datetime | None) -> str:
        if fmt == "json":
            return json.dumps({"generated_at": now.isoformat(), "period": period, "group_by": group_by,
                               "from": start.isoformat() if start else None, "to": end.isoformat() if end else None,
                               "budgets": report}, indent=2) + "\n"
        if fmt == "csv":
            header = [*BUDGET_COLUMNS, "range_from", "range_to", "range_cost_usd"]
            if group_by:
                header += ["group_by", "group", *METRICS]
            lines = []
            for item in report:
                base = [_cell(item[c]) for c in BUDGET_COLUMNS]
                rng = item["range"] or {}
                base += [rng.get("from"), rng.get("to"), rng.get("cost_usd")]
                if not group_by:
                    lines.append(base)
                    continue
                for g in item["groups"] or []:
                    lines.append([*base, group_by, g["group"], *(g[m] for m in METRICS)])
                if not item["groups"]:
                    lines.append([*base, group_by, None, *([None] * len(METRICS))])
            return to_csv(header, lines)
        return self._table(report, now=now, period=period, group_by=group_by)

    @staticmethod
    def _table(report: list[dict], *, now: datetime, period: str | None, group_by: str | None) -> str:
        title = f"Budgets at {now:%Y-%m-%d %H:%M} UTC" + (f" (period {period})" if period else "")
        if not report:
            return f"{title}\nNo enabled budgets.\n"
        ranged = any(item["range"] for item in report)
        header = ["ID", "Budget", "Scope", "Period", "Since", "Limit USD", "Spent USD", "Reserved USD", "Used",
                  "Projected USD", "Proj.", "Status"] + (["In range USD"] if ranged else [])
        body = []
        for item in report:
            line = [str(item["id"]), item["budget"], item["scope"], item["period"], item["period_start"][:10],
                    _usd(item["limit_usd"]), _usd(item["spent_usd"]), _usd(item["reserved_usd"]),
                    _pct(item["used_pct"]), _usd(item["projected_usd"]), _pct(item["projected_pct"]),
                    item["status"]]
            if ranged:
                line.append(_usd(item["range"]["cost_usd"]) if item["range"] else "—")
            body.append(line)
        right = {0, 5, 6, 7, 8, 9, 10, 12}
        out = [title, *_align([header, *body], right)]
        if group_by:
            for item in report:
                rng = item["range"]
                out += ["", f"{item['budget']} (#{item['id']}): spend by {group_by}, {rng['from'][:16]} → "
                            f"{rng['to'][:16]}"]
                if not item["groups"]:
                    out.append("  no usage")
                    continue
                rows = [[group_by.capitalize(), "Requests", "Calls", "Prompt tokens", "Completion tokens", "USD"]]
                rows += [[str(g["group"]) if g["group"] is not None else "(none)", f"{g['requests']:,}",
                          f"{g['calls']:,}", f"{g['prompt_tokens']:,}", f"{g['completion_tokens']:,}",
                          _usd(g["cost_usd"])] for g in item["groups"]]
                out += ["  " + line for line in _align(rows, {1, 2, 3, 4, 5})]
        return "\n".join(out) + "\n"

    # --- output ----------------------------------------------------------------------------

    @staticmethod
    def _write(path: str, text: str) -> None:
        """Write beside the target, fsync, then rename over it: readers see the old file or the
        whole new one."""
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, temp = tempfile.mkstemp(prefix=".budget_report-", suffix=".tmp", dir=folder)
        except OSError as exc:
            raise CommandError(f"Cannot write to {folder}: {exc.strerror}.") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(temp, 0o644)
            os.replace(temp, path)
        except OSError as exc:
            if os.path.exists(temp):
                os.unlink(temp)
            raise CommandError(f"Cannot write {path}: {exc.strerror}.") from None
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise


def _metrics(g: dict) -> dict:
    return {m: (money(g[m]) if m == "cost_usd" else g[m]) for m in METRICS}


def _group_order(group_by: str):
    if group_by == "day":
        return lambda g: g["day"] or ""
    return lambda g: (-g["cost_usd"], str(g[group_by]))


def _cell(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def _usd(text: str | None) -> str:
    if text is None:
        return "—"
    return f"{Decimal(text):,.6f}"


def _pct(text: str | None) -> str:
    return "—" if text is None else f"{text} %"


def _align(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return lines

