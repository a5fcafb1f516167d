"""The beat schedule inside the process: the embedded default runs no Celery beat, yet its
budget periods must roll over, usage must roll up, idempotency records must be purged and
interrupted runs swept. With INPROCESS_BEAT (default: on when Celery runs eagerly) each ASGI
process (agentplatform.asgi) starts one daemon thread that runs CELERY_BEAT_SCHEDULE's tasks
at their times, using Celery's own schedule objects (seconds or crontab), eagerly in that
thread. Every scheduled task is safe to run twice (several processes each run the schedule).

    start_inprocess_beat()    # once per process; later calls do nothing
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger("agentplatform.scheduler")

_started = False
_lock = threading.Lock()


class InProcessBeat:
    def __init__(self, schedule: dict, *, now: datetime | None = None) -> None:
        from celery.schedules import schedule as every

        from .celery import app

        app.loader.import_default_modules()  # every app's tasks registered before they are named
        self.app = app
        start = now or datetime.now(dt_timezone.utc)
        self.entries: list[dict] = []
        for name, entry in schedule.items():
            sched = entry["schedule"]
            if isinstance(sched, (int, float)):
                sched = every(timedelta(seconds=float(sched)))
            elif isinstance(sched, timedelta):
                sched = every(sched)
            sched.app = app
            # Like Celery beat: the first run one interval (or the next crontab time) after start.
            self.entries.append({"name": name, "task": entry["task"], "schedule": sched, "last_run_at": start,
                                 "runs": 0, "failures": 0})
        self.stop = threading.Event()

    def tick(self) -> float:
        """Run what is due; returns how many seconds until something may be due."""
        wait = 60.0
        for entry in self.entries:
            due, next_in = entry["schedule"].is_due(entry["last_run_at"])
            if due:
                entry["last_run_at"] = datetime.now(dt_timezone.utc)
                self.run(entry)
            wait = min(wait, max(float(next_in), 0.05))
        return wait

    def run(self, entry: dict) -> None:
        task = self.app.tasks.get(entry["task"])
        if task is None:
            logger.error("Scheduled task %s (%s) is not registered", entry["task"], entry["name"])
            return
        try:
            task.apply(throw=True)
            entry["runs"] += 1
        except Exception:
            entry["failures"] += 1
            logger.exception("Scheduled task %s failed", entry["name"])
        finally:
            close_old_connections()

    def loop(self) -> None:
        while not self.stop.is_set():
            self.stop.wait(self.tick())


def start_inprocess_beat() -> InProcessBeat | None:
    """Start the in-process beat thread when INPROCESS_BEAT is on (once per process)."""
    global _started
    if not settings.INPROCESS_BEAT:
        return None
    with _lock:
        if _started:
            return None
        _started = True
    beat = InProcessBeat(settings.CELERY_BEAT_SCHEDULE)
    threading.Thread(target=beat.loop, name="inprocess-beat", daemon=True).start()
    logger.info("In-process beat started: %s", ", ".join(e["name"] for e in beat.entries))
    return beat
