"""`manage.py rotate_api_keys [--older-than 90d] [--key PREFIX] [--grace 24h] [--dry-run] [--json] [--output FILE]`.

Rotates the selected keys (not revoked, not expired): each gets a new secret, its previous one
keeps working for the grace period. The listing (name, prefix, role, age since the key was made
or last rotated) and a progress line per key go to stdout; the new secrets are handed over once,
on stdout or in FILE, which is created with mode 0600 and never overwritten.

All keys rotate in one transaction, and the secrets are written (and, for a file, fsynced)
before it commits: if writing them fails, nothing is rotated and the old secrets keep working,
so a secret can never be lost between the database and the operator.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from datetime import timedelta
from typing import IO, Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from agentplatform.errors import PlatformError
from governance.models import ApiKey
from governance.services import MAX_GRACE_SECONDS, api_key_rotate

_DURATION_RE = re.compile(r"^(\d{1,7})([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> int:
    """'90d', '24h', '30m', '3600s' → seconds (argparse type)."""
    match = _DURATION_RE.match(value.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{value!r} is not a duration such as 90d, 24h, 30m or 3600s.")
    return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def human(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{seconds}s"


class Command(BaseCommand):
    help = ("Rotate API keys: new secrets, the previous ones valid for a grace period. Secrets are printed once "
            "(or written to a new file with mode 0600); only their hashes are stored.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--older-than", type=duration, default=None, metavar="DURATION",
                            help="Keys made or last rotated longer ago than this (90d, 24h, 30m, 3600s).")
        parser.add_argument("--key", action="append", default=[], metavar="PREFIX", dest="keys",
                            help="Rotate the key with this prefix (repeatable). Combined with --older-than, "
                                 "only those of them that are old enough.")
        parser.add_argument("--grace", type=duration, default=None, metavar="DURATION",
                            help="How long the previous secrets keep working (default "
                                 f"{settings.API_KEY_ROTATION_GRACE_SECONDS}s; 0s stops them at once).")
        parser.add_argument("--dry-run", action="store_true", help="List what would be rotated; change nothing.")
        parser.add_argument("--json", action="store_true",
                            help='Print one JSON object {"dry_run", "grace_seconds", "keys": [{"prefix", "name", '
                                 '"role", "age_seconds", "previous_secret_expires_at", "key"}]}; progress lines '
                                 'go to stderr.')
        parser.add_argument("--output", default=None, metavar="FILE",
                            help="Write the new secrets to FILE (created with mode 0600; an existing file is "
                                 "refused) instead of stdout.")

    def handle(self, *args: Any, older_than: int | None, keys: list[str], grace: int | None, dry_run: bool,
               output: str | None, **options: Any) -> None:
        as_json = options["json"]
        if older_than is None and not keys:
            raise CommandError("Choose the keys: --older-than DURATION and/or --key PREFIX.")
        if older_than is not None and older_than <= 0:
            raise CommandError("--older-than must be longer than 0.")
        grace = settings.API_KEY_ROTATION_GRACE_SECONDS if grace is None else grace
        if grace > MAX_GRACE_SECONDS:
            raise CommandError(f"--grace may be at most {human(MAX_GRACE_SECONDS)}.")
        if output is not None and os.path.lexists(output):
            raise CommandError(f"{output} exists: it is never overwritten. Choose a new file.")

        selected = self._select(older_than, keys)
        now = timezone.now()
        progress = self.stderr if as_json else self.stdout
        verb = "Would rotate" if dry_run else "Rotating"
        if not selected:
            progress.write("No keys to rotate.")
        else:
            progress.write(f"{verb} {len(selected)} key{'s' if len(selected) != 1 else ''} "
                           f"(grace period {human(grace) if grace else 'none'}):")
        rows = [{"prefix": k.prefix, "name": k.name, "role": k.role,
                 "age_seconds": int((now - (k.rotated_at or k.created_at)).total_seconds())} for k in selected]

        if dry_run or not selected:
            for index, row in enumerate(rows, 1):
                progress.write(self._line(index, len(rows), row, "would rotate" if dry_run else ""))
            if as_json:
                self.stdout.write(json.dumps({"dry_run": dry_run, "grace_seconds": grace, "keys": rows}))
            if dry_run:
                progress.write("Dry run: nothing was changed.")
            return

        sink = self._open(output) if output else None
        try:
            with transaction.atomic():
                for index, (api_key, row) in enumerate(zip(selected, rows), 1):
                    try:
                        api_key, secret = api_key_rotate(api_key=api_key, grace_seconds=grace, actor="system")
                    except PlatformError as exc:
                        raise CommandError(f"{api_key.name} ({api_key.prefix}): {exc.message} "
                                           "Nothing was rotated.") from None
                    row["previous_secret_expires_at"] = (api_key.previous_secret_expires_at.isoformat()
                                                         if api_key.previous_secret_expires_at else None)
                    row["key"] = secret
                    progress.write(self._line(index, len(rows), row, "rotated"))
                self._hand_over(rows, grace, as_json, sink)
        except BaseException:
            if sink is not None:
                sink.close()
                os.unlink(output)  # its secrets never took effect
            raise
        if sink is not None:
            sink.close()
            summary = {"dry_run": False, "grace_seconds": grace, "output": output,
                       "keys": [{k: v for k, v in row.items() if k != "key"} for row in rows]}
            if as_json:
                self.stdout.write(json.dumps(summary))
            progress.write(f"Rotated {len(rows)} key{'s' if len(rows) != 1 else ''}; the new secrets are in "
                           f"{output} (mode 0600).")
        else:
            progress.write(f"Rotated {len(rows)} key{'s' if len(rows) != 1 else ''}. Store the new secrets now: "
                           "they will not be shown again; only their hashes are stored.")

    @staticmethod
    def _select(older_than: int | None, prefixes: list[str]) -> list[ApiKey]:
        now = timezone.now()
        queryset = ApiKey.objects.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now), revoked_at__isnull=True)
        if prefixes:
            found = {k.prefix: k for k in ApiKey.objects.filter(prefix__in=prefixes)}
            for prefix in prefixes:
                key = found.get(prefix)
                if key is None:
                    raise CommandError(f"No API key with prefix {prefix!r}.")
                if key.revoked_at is not None:
                    raise CommandError(f"{key.name} ({prefix}) is revoked: it cannot be rotated.")
                if key.expires_at is not None and key.expires_at <= now:
                    raise CommandError(f"{key.name} ({prefix}) has expired: extend it before rotating.")
            queryset = queryset.filter(prefix__in=prefixes)
        if older_than is not None:
            cutoff = now - timedelta(seconds=older_than)
            queryset = queryset.filter(Q(rotated_at__lt=cutoff) | Q(rotated_at__isnull=True, created_at__lt=cutoff))
        return list(queryset.order_by("created_at", "pk"))

    @staticmethod
    def _line(index: int, total: int, row: dict, state: str) -> str:
        line = f"  [{index}/{total}] {row['name']} (prefix {row['prefix']}, role {row['role']}, " \
               f"age {human(row['age_seconds'])})"
        return f"{line} {state}".rstrip()

    @staticmethod
    def _open(path: str) -> IO[str]:
        # O_EXCL: refuse to follow a symlink or overwrite a file planted between the check and now.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise CommandError(f"{path} exists: it is never overwritten. Choose a new file.") from None
        except OSError as exc:
            raise CommandError(f"Cannot create {path}: {exc.strerror}.") from None
        os.fchmod(fd, 0o600)  # whatever the umask
        return os.fdopen(fd, "w", encoding="utf-8")

    def _hand_over(self, rows: list[dict], grace: int, as_json: bool, sink: IO[str] | None) -> None:
        """Write the secrets (inside the rotation's transaction: a failure here rotates nothing)."""
        if as_json:
            text = json.dumps({"dry_run": False, "grace_seconds": grace, "keys": rows}) + "\n"
        elif sink is not None:
            text = "".join(f"{row['prefix']}\t{row['name']}\t{row['key']}\n" for row in rows)
            text = "# prefix\tname\tkey\n" + text
        else:
            text = "".join(f"{row['name']} ({row['prefix']}): {row['key']}\n" for row in rows)
        if sink is None:
            self.stdout.write(text, ending="")
            self.stdout.flush()
            return
        sink.write(text)
        sink.flush()
        os.fsync(sink.fileno())

