"""`manage.py load_agents FILE [--dry-run]`: validate and upsert agent definitions (agents.loading)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from agentplatform.errors import PlatformError
from agents.loading import DefinitionsInvalid, agents_load, definitions_read


class Command(BaseCommand):
    help = ("Load agents and skills from a YAML (.yaml/.yml) or JSON (.json) file, upserting by name. "
            "All or nothing: every bad entry is reported and then nothing is written. "
            "The format is documented in agents/fixtures/demo_agents.yaml.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("file", help="Path of the definitions file.")
        parser.add_argument("--dry-run", action="store_true", help="Validate only; write nothing.")

    def handle(self, *args, file: str, dry_run: bool, **options) -> None:
        try:
            result = agents_load(definitions=definitions_read(path=file), dry_run=dry_run)
        except DefinitionsInvalid as exc:
            for line in exc.errors:
                self.stderr.write(line)
            raise CommandError(f"{file}: {exc.message}") from None
        except PlatformError as exc:
            raise CommandError(exc.message) from None
        self.stdout.write(self.style.SUCCESS(result.summary()))
