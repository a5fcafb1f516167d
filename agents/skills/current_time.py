"""current_time: the date and time now, in UTC or an IANA time zone."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.utils import timezone

from agents.skills.base import SkillContext, SkillError

# Not strftime("%A"): that follows the process locale.
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def current_time_in(zone_name: str | None = None) -> str:
    """'2026-11-24T19:30:00+00:00 (Tuesday, UTC)' for the zone (UTC when not given)."""
    if zone_name is None or (isinstance(zone_name, str) and not zone_name.strip()):
        zone_name = "UTC"
    if not isinstance(zone_name, str) or len(zone_name) > 64:
        raise SkillError("timezone must be an IANA time zone name such as 'Europe/Paris'")
    zone_name = zone_name.strip()
    try:
        zone = ZoneInfo(zone_name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        # ValueError: keys zoneinfo refuses outright (absolute paths, '..').
        raise SkillError(f"unknown time zone {zone_name!r}; use an IANA name such as 'Europe/Paris'") from exc
    now = timezone.now().astimezone(zone).replace(microsecond=0)
    return f"{now.isoformat()} ({WEEKDAYS[now.weekday()]}, {zone_name})"


class CurrentTime:
    name = "current_time"
    description = "Get the current date, time and weekday, in UTC or in a given IANA time zone."
    parameters = {
        "type": "object",
        "properties": {
            "timezone": {"type": "string",
                         "description": "IANA time zone name, e.g. 'Europe/Paris' or 'America/New_York'. "
                                        "Default: UTC."},
        },
        "required": [],
        "additionalProperties": False,
    }

    async def run(self, arguments: dict, *, config: dict, context: SkillContext) -> str:
        return current_time_in(arguments.get("timezone"))
