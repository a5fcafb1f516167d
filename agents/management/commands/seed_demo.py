"""`manage.py seed_demo [--json]`: the demo's skills, agents, superuser and API key (agents.loading.demo_seed)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from agentplatform.errors import PlatformError
from agents.loading import DEMO_FIXTURE, DefinitionsInvalid, demo_seed


class Command(BaseCommand):
    help = ("Create what is missing of the demo: the built-in skills, the agents of "
            f"{DEMO_FIXTURE.name} (model: the DEMO_MODEL setting), a superuser `admin` and an admin "
            "API key named `demo`. Idempotent: existing agents, skills, user and key are left alone. "
            "The password and key are printed once.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--json", action="store_true",
                            help='Print one JSON object: {"admin_user", "admin_password", "api_key", "agents"}; '
                                 "the password and key are null when they existed already.")

    def handle(self, *args, **options) -> None:
        try:
            seeded = demo_seed()
        except DefinitionsInvalid as exc:
            for line in exc.errors:
                self.stderr.write(line)
            raise CommandError(f"{DEMO_FIXTURE}: {exc.message}") from None
        except PlatformError as exc:
            raise CommandError(exc.message) from None
        load = seeded.load
        if options["json"]:
            self.stdout.write(json.dumps({
                "admin_user": seeded.admin_user,
                "admin_password": seeded.admin_password,
                "api_key": seeded.api_key,
                "agents": load.agent_names,
            }))
            return

        created = ", ".join(load.agents_created) or "none"
        kept = ", ".join(load.agents_kept) or "none"
        self.stdout.write(f"Agents created: {created}; already there (left as they are): {kept}.")
        self.stdout.write(f"Skills created: {', '.join(load.skills_created) or 'none'}.")
        if seeded.admin_password is None:
            self.stdout.write(f"Superuser {seeded.admin_user!r} already exists; its password is unchanged.")
        else:
            self.stdout.write(f"Created superuser {seeded.admin_user!r} with password: {seeded.admin_password}")
        if seeded.api_key is None:
            self.stdout.write("The API key 'demo' already exists; it is not shown again.")
        else:
            self.stdout.write(f"Created admin API key 'demo': {seeded.api_key}")
        if seeded.admin_password is not None or seeded.api_key is not None:
            self.stdout.write(self.style.WARNING("Store these now: they will not be shown again."))

