"""Walk the audit log's hash chain: exit 0 when it is intact, 1 naming the first broken entry.

    manage.py verify_audit_log [--json] [--anchor HASH] [--no-sequence] [--chunk-size N] [--progress-every N]

Every entry committed so far is chained first (the sequencer's work, governance.audit; waiting
for a sequencer that is running), so the check covers the whole log; --no-sequence checks the
chain as it is and reports the entries not chained yet as `pending`.

--anchor takes a head hash printed by an earlier run (kept outside the database): if the
newest entries were removed since, that hash is gone from the chain and the check fails.
"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from governance.audit import audit_chain_sequence_all, audit_chain_verify


class Command(BaseCommand):
    help = "Verify the audit log's hash chain; exit non-zero naming the first altered or missing entry."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
        parser.add_argument("--anchor", metavar="HASH",
                            help="A head hash recorded earlier: fail if it is no longer in the chain.")
        parser.add_argument("--no-sequence", action="store_true",
                            help="Do not chain the entries committed since the sequencer last ran.")
        parser.add_argument("--chunk-size", type=int, default=2000, help="Rows fetched per round trip.")
        parser.add_argument("--progress-every", type=int, default=100_000,
                            help="Report progress on stderr every N entries (0: never).")

    def handle(self, *args: Any, **options: Any) -> None:
        every = options["progress_every"]

        def progress(count: int) -> None:
            self.stderr.write(f"… {count} entries verified")

        if not options["no_sequence"]:
            audit_chain_sequence_all()
        report = audit_chain_verify(chunk_size=options["chunk_size"], anchor=options["anchor"],
                                    progress=progress if every > 0 and options["verbosity"] > 0 else None,
                                    progress_every=max(every, 1))
        broken = report.broken
        if broken is not None:
            problem = broken.message
        elif report.anchor_found is False:
            problem = f"the anchor {options['anchor']} is not in the chain (entries were removed or replaced)"
        else:
            problem = None
        if options["json"]:
            self.stdout.write(json.dumps({
                "ok": report.ok,
                "count": report.count,
                "head": report.head,
                "broken": {"id": broken.id, "problem": broken.problem, "message": broken.message} if broken else None,
                "anchor_found": report.anchor_found,
                "pending": report.pending,
            }))
        elif report.ok:
            pending = f" ({report.pending} entries not chained yet)" if report.pending else ""
            self.stdout.write(f"Audit log intact: {report.count} entries, head {report.head or '(empty log)'}.{pending}")
        if problem is not None:
            raise CommandError(f"Audit log broken: {problem}.", returncode=1)
