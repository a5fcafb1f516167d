"""Canary rollouts: the candidate variant's share ramps through the experiment's steps
(e.g. 5 → 25 → 50 → 100 %), one step every `canary_interval_minutes`, and rolls back by itself.

`canary_step(experiment_id=..., now=...)` is the whole decision, driven by the beat task
(`canaries_advance`, CELERY_BEAT_SCHEDULE "advance-canaries"; in-process on the embedded
default, agentplatform.scheduler) for every ramping canary whose step is due. Before moving on
it compares the candidate with the control over the runs of the current step:

  * fewer than `canary_min_sample` candidate requests in the step: wait (checked again next tick);
  * candidate error rate − control error rate > `canary_max_error_rate_delta`, or candidate p95
    latency > control p95 × `canary_max_p95_ratio` (and at least P95_MIN_DIFFERENCE_MS slower): roll back — the candidate's weight to 0 %,
    the control to 100 %, the experiment finished with canary_state `rolled_back`, an
    "experiment.canary.rolled_back" audit entry with the figures, and a notice through the budget
    alerts' channels (billing.alerts.notice_send: e-mail, signed webhook, retries), all in one
    transaction;
  * otherwise: the next step (audited "experiment.canary.advanced"); past the last step the
    canary is `completed` (the candidate serves 100 %; promote it to make it the agent's).
The row is locked for the decision (select_for_update), so two schedulers cannot both step it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from agents.models import Run
from billing.alerts import notice_send
from governance.audit import audit_record

from . import stats
from .models import Experiment
from .results import ERROR_STATUSES
from .services import canary_set_share

logger = logging.getLogger("experiments.canary")

# A p95 this much slower at least, whatever the ratio: 2 ms against 5 ms is noise (a new
# connection, a GC pause), not a regression to roll back for.
P95_MIN_DIFFERENCE_MS = 100.0


@dataclass(frozen=True)
class ArmFigures:
    requests: int
    errors: int
    p95_ms: float | None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def as_dict(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "error_rate": self.error_rate, "p95_ms": self.p95_ms}


def _figures(experiment: Experiment, variant: str, since: datetime | None) -> ArmFigures:
    runs = Run.objects.filter(experiment_id=experiment.id, variant=variant, status__in=Run.FINAL_STATUSES)
    if since is not None:
        runs = runs.filter(started_at__gte=since)
    rows = list(runs.values_list("status", "latency_ms"))
    latencies = [float(l) for _, l in rows if l is not None]
    return ArmFigures(len(rows), sum(1 for s, _ in rows if s in ERROR_STATUSES), stats.percentile(latencies, 95))


def _breach(experiment: Experiment, candidate: ArmFigures, control: ArmFigures) -> str | None:
    if control.requests and candidate.error_rate is not None and control.error_rate is not None \
            and candidate.error_rate - control.error_rate > experiment.canary_max_error_rate_delta:
        return (f"error rate {candidate.error_rate:.1%} vs the control's {control.error_rate:.1%} "
                f"(more than {experiment.canary_max_error_rate_delta:.1%} worse)")
    if not control.requests and candidate.error_rate is not None \
            and candidate.error_rate > experiment.canary_max_error_rate_delta:
        return f"error rate {candidate.error_rate:.1%} (over {experiment.canary_max_error_rate_delta:.1%})"
    if candidate.p95_ms is not None and control.p95_ms and \
            candidate.p95_ms > control.p95_ms * experiment.canary_max_p95_ratio and \
            candidate.p95_ms - control.p95_ms >= P95_MIN_DIFFERENCE_MS:
        return (f"p95 latency {candidate.p95_ms:.0f} ms vs the control's {control.p95_ms:.0f} ms "
                f"(over {experiment.canary_max_p95_ratio:g}×)")
    return None


def canary_step(*, experiment_id: int, now: datetime | None = None) -> str:
    """Decide one due canary step: "waiting", "advanced", "completed", "rolled_back" or
    "not_due" (not a ramping canary, or its step not due yet)."""
    now = now or timezone.now()
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update().select_related("agent").filter(pk=experiment_id).first()
        if experiment is None or experiment.mode != Experiment.Mode.CANARY \
                or experiment.status != Experiment.Status.RUNNING \
                or experiment.canary_state != Experiment.CanaryState.RAMPING \
                or (experiment.canary_next_at is not None and experiment.canary_next_at > now):
            return "not_due"
        variants = list(experiment.variants.all())
        control = next(v for v in variants if v.is_control)
        candidate = next(v for v in variants if not v.is_control)
        since = experiment.canary_step_started_at
        cand, ctrl = _figures(experiment, candidate.name, since), _figures(experiment, control.name, since)
        steps = experiment.canary_steps
        share = steps[experiment.canary_step]
        details = {"experiment_id": experiment.id, "agent": experiment.agent.name, "candidate": candidate.name,
                   "share": share, "step": experiment.canary_step, "candidate_figures": cand.as_dict(),
                   "control_figures": ctrl.as_dict(),
                   "thresholds": {"max_error_rate_delta": experiment.canary_max_error_rate_delta,
                                  "max_p95_ratio": experiment.canary_max_p95_ratio,
                                  "min_sample": experiment.canary_min_sample}}
        target = f"experiment:{experiment.name}"
        breach = _breach(experiment, cand, ctrl) if cand.requests >= experiment.canary_min_sample else None
        if breach is not None:
            canary_set_share(experiment, 0)
            experiment.canary_state = Experiment.CanaryState.ROLLED_BACK
            experiment.status = Experiment.Status.FINISHED
            experiment.ended_at = now
            experiment.canary_next_at = None
            experiment.save()
            audit_record(actor="system", action="experiment.canary.rolled_back", target=target, outcome="error",
                         details={**details, "reason": breach})
            text = (f"The canary {candidate.name!r} of experiment {experiment.name!r} on agent "
                    f"{experiment.agent.name!r} was rolled back to 0 % at {share} %: {breach}.\n\n"
                    f"Candidate: {cand.requests} requests, {cand.errors} errors, p95 {cand.p95_ms} ms\n"
                    f"Control:   {ctrl.requests} requests, {ctrl.errors} errors, p95 {ctrl.p95_ms} ms\n")
            notice_send(event="experiment.rolled_back",
                        subject=f"Canary rolled back: {experiment.name} ({experiment.agent.name})", text=text,
                        body={**details, "experiment": experiment.name, "reason": breach})
            logger.warning("Canary %s of experiment %s rolled back: %s", candidate.name, experiment.name, breach)
            return "rolled_back"
        if cand.requests < experiment.canary_min_sample:
            return "waiting"
        if experiment.canary_step + 1 >= len(steps):
            experiment.canary_state = Experiment.CanaryState.COMPLETED
            experiment.canary_next_at = None
            experiment.save()
            audit_record(actor="system", action="experiment.canary.completed", target=target, details=details)
            return "completed"
        experiment.canary_step += 1
        experiment.canary_step_started_at = now
        experiment.canary_next_at = now + timedelta(minutes=experiment.canary_interval_minutes)
        canary_set_share(experiment, steps[experiment.canary_step])
        experiment.save()
        audit_record(actor="system", action="experiment.canary.advanced", target=target,
                     details={**details, "new_share": steps[experiment.canary_step]})
        return "advanced"


def canaries_advance(now: datetime | None = None) -> int:
    """Step every ramping canary whose step is due (the beat task); returns how many moved."""
    now = now or timezone.now()
    due = list(Experiment.objects.filter(mode=Experiment.Mode.CANARY, status=Experiment.Status.RUNNING,
                                         canary_state=Experiment.CanaryState.RAMPING, canary_next_at__lte=now)
               .values_list("id", flat=True))
    moved = 0
    for experiment_id in due:
        try:
            moved += canary_step(experiment_id=experiment_id, now=now) in ("advanced", "completed", "rolled_back")
        except Exception:
            logger.exception("Canary step of experiment %s failed", experiment_id)
    return moved
