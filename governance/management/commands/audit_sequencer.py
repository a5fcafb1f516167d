"""The audit chain's sequencer: chain committed audit entries, in a loop (governance.audit).

    manage.py audit_sequencer [--once] [--interval SECONDS]

Every AUDIT_SEQUENCER_INTERVAL_SECONDS (default 0.5) it chains what was committed since, batch
after batch while there is more; each batch logs the new head ("audit chain head seq=... hash=...").
Any number may run (one per host, for failover): the chain's lock lets one work at a time, the
others find it taken and wait for the next round. SIGTERM or SIGINT stops it after the batch at
hand. On SQLite, entries are chained as they are appended: there is nothing to do, but it runs.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import close_old_connections

from governance.audit import SEQUENCE_BATCH, audit_chain_sequence, audit_chain_sequence_all


class Command(BaseCommand):
    help = "Chain committed audit entries (once, or in a loop until stopped)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="Chain what is committed now, then exit.")
        parser.add_argument("--interval", type=float, default=None,
                            help="Seconds between rounds (default AUDIT_SEQUENCER_INTERVAL_SECONDS).")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["once"]:
            self.stdout.write(f"{audit_chain_sequence_all()} entries chained")
            return
        interval = options["interval"] or settings.AUDIT_SEQUENCER_INTERVAL_SECONDS
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.stderr.write(f"audit sequencer: chaining every {interval:g}s")
        while not stop.is_set():
            close_old_connections()
            while audit_chain_sequence() == SEQUENCE_BATCH and not stop.is_set():
                pass  # a full batch: there may be more at once
            stop.wait(interval)
        close_old_connections()
