"""TEST_FAKE_NOW=2027-03-01T00:00:30Z: run the test session at that instant, the clock ticking
from there (time-machine patches the C-level clock functions process-wide, so every thread sees
it: the chat path's database threads, asgiref's sync thread, the fake upstream's server thread).

tests/conftest.py starts it in the pytest process and puts this directory on PYTHONPATH, so
Python imports this module at start-up in every process the tests spawn with the inherited
environment (xdist workers, daphne and Celery workers, setup scripts): they all travel too, to
the same moving instant: TEST_FAKE_NOW plus the real seconds since the first process started
(TEST_FAKE_NOW_STARTED_AT, set by that first process)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
import time
from datetime import datetime, timedelta

_HERE = os.path.dirname(os.path.abspath(__file__))


def fake_now() -> datetime | None:
    """The instant TEST_FAKE_NOW names, or None when it is unset; ValueError when malformed."""
    raw = os.environ.get("TEST_FAKE_NOW", "").strip()
    if not raw:
        return None
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"TEST_FAKE_NOW={raw!r} is not an ISO 8601 instant such as 2027-03-01T00:00:30Z") from None
    if when.tzinfo is None:
        raise ValueError(f"TEST_FAKE_NOW={raw!r} needs a UTC offset or Z, e.g. 2027-03-01T00:00:30Z")
    return when


def start() -> datetime | None:
    """Travel to TEST_FAKE_NOW's moving instant (once per process); returns where it went."""
    when = fake_now()
    # Once per process, however often this file is loaded (at start-up, then by conftest).
    if when is None or os.environ.get("TEST_FAKE_NOW_TRAVELLING") == str(os.getpid()):
        return None
    import time_machine

    # Read before travelling: the real clock.
    started = float(os.environ.setdefault("TEST_FAKE_NOW_STARTED_AT", repr(time.time())))
    when += timedelta(seconds=time.time() - started)
    time_machine.travel(when, tick=True).start()  # for the life of the process
    os.environ["TEST_FAKE_NOW_TRAVELLING"] = str(os.getpid())
    path = os.environ.get("PYTHONPATH", "")
    if _HERE not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_HERE, path) if p)
    return when


def _run_the_sitecustomize_this_one_shadows() -> None:
    rest = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


if __name__ == "sitecustomize":  # imported by Python at start-up, not by conftest
    try:
        start()
    except ValueError as error:
        print(f"tests/fake_now: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    _run_the_sitecustomize_this_one_shadows()
