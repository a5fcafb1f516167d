"""`manage.py create_api_key --name NAME --role ROLE [--agents a,b | --all-agents] [--expires-in-days N] [--json]`.

Also the way back in when no admin key is left: the admin REST API refuses to take away the
last active one, but a key can still be revoked in the Django admin or expire.
"""

from __future__ import annotations

import json
from datetime import timedelta

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from agentplatform.errors import PlatformError
from governance.models import ApiKey
from governance.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key. The secret is printed once and cannot be retrieved again (only its hash is stored)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--name", required=True, help="A label for the key (1-100 characters).")
        parser.add_argument("--role", required=True, help=f"One of: {', '.join(ApiKey.Role.values)}.")
        scope = parser.add_mutually_exclusive_group()
        scope.add_argument("--agents", default=None,
                           help="Comma-separated names of the only agents the key may call.")
        scope.add_argument("--all-agents", action="store_true",
                           help="The key may call every agent, also agents added later (the default without "
                                "--agents).")
        parser.add_argument("--expires-in-days", type=int, default=None, help="Expire the key after N days.")
        parser.add_argument("--json", action="store_true",
                            help='Print one JSON object: {"key", "prefix", "name", "role", "all_agents", "agents", '
                                 '"expires_at"} ("agents" lists the agents of a key with "all_agents": false).')

    def handle(self, *args, name: str, role: str, agents: str | None, all_agents: bool, expires_in_days: int | None,
               **options) -> None:
        agent_names = None
        if agents is not None:
            agent_names = [a.strip() for a in agents.split(",") if a.strip()]
            if not agent_names:
                raise CommandError("--agents needs at least one agent name; use --all-agents (or leave both out) "
                                   "for a key that may call every agent.")
        expires_at = None
        if expires_in_days is not None:
            if expires_in_days <= 0:
                raise CommandError("--expires-in-days must be a positive number of days.")
            expires_at = timezone.now() + timedelta(days=expires_in_days)
        try:
            api_key, secret = api_key_create(name=name, role=role, agent_names=agent_names,
                                             all_agents=True if all_agents else None, expires_at=expires_at)
        except PlatformError as exc:
            raise CommandError(exc.message) from None

        linked = sorted(a.name for a in api_key.agents.all())
        expires = api_key.expires_at.isoformat() if api_key.expires_at else None
        if options["json"]:
            self.stdout.write(json.dumps({"key": secret, "prefix": api_key.prefix, "name": api_key.name,
                                          "role": api_key.role, "all_agents": api_key.all_agents, "agents": linked,
                                          "expires_at": expires}))
            return
        scope = "all" if api_key.all_agents else ", ".join(linked)
        self.stdout.write(f"Created API key {api_key.name!r} (prefix {api_key.prefix}, role {api_key.role}, "
                          f"agents: {scope}, expires: {expires or 'never'}).")
        self.stdout.write(secret)
        self.stdout.write(self.style.WARNING("Store it now: it will not be shown again; only its hash is stored."))
