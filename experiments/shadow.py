"""Shadow traffic: a share of an experiment's live runs answered again by its shadow variant,
in the background, for side-by-side comparison in the admin.

The live run is never touched: its ShadowRun row is written in the live run's transaction
(experiments.stages) and enqueued once that commits — on a Celery worker, or on the embedded
default this process's background loop (agentplatform.background), never inside the request —
so the caller's answer, latency and budget reservation are the same as without shadowing.

A shadow run calls the model directly (agents.runtime.AgentRun, no pipeline): no Run row, no
usage record, no budget reservation of the caller's key. It is offered no skills (a tool with
side effects must not run twice for one request). Its cost is priced like any call
(billing.pricing, prices in force when it ran) and stored on the ShadowRun: shadow spend is
metered and attributed to the experiment, separately from every key's usage. When today's
(UTC) shadow spend reached EXPERIMENT_SHADOW_DAILY_LIMIT_USD, further shadow runs are `skipped`.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, time as dt_time, timezone as dt_timezone
from decimal import Decimal

from django.conf import settings
from django.db.models import Sum
from django.utils import timezone

from agentplatform.background import background_submit
from agentplatform.db import run_db
from agents.runtime import AgentRun
from agents.selectors import agent_spec_from_model, agents_with_skills
from billing.pricing import call_cost, price_from, prices_load
from governance.masking import mask_data, mask_text

from .models import ShadowRun, Variant
from .selectors import variant_entry
from .variants import variant_spec

logger = logging.getLogger("experiments.shadow")


def _eager() -> bool:
    from .tasks import shadow_run_task

    return bool(shadow_run_task.app.conf.task_always_eager)


def shadow_run_enqueue(shadow_id: int) -> None:
    """Hand a shadow run to a worker (eager: the background loop); never raises."""
    from .tasks import shadow_run_task

    try:
        if _eager():
            background_submit(shadow_run_execute(shadow_id))
        else:
            shadow_run_task.apply_async(args=[shadow_id])
    except Exception:
        logger.exception("Could not enqueue shadow run %s", shadow_id)


def shadow_spend_today(now: datetime | None = None) -> Decimal:
    now = now or timezone.now()
    start = datetime.combine(now.astimezone(dt_timezone.utc).date(), dt_time(0), tzinfo=dt_timezone.utc)
    return ShadowRun.objects.filter(created_at__gte=start).aggregate(total=Sum("cost_usd"))["total"] or Decimal("0")


def _load(shadow_id: int):
    row = ShadowRun.objects.select_related("experiment").filter(pk=shadow_id, status=ShadowRun.Status.QUEUED).first()
    if row is None:
        return None
    limit = settings.EXPERIMENT_SHADOW_DAILY_LIMIT_USD
    if limit is not None and shadow_spend_today() >= limit:
        ShadowRun.objects.filter(pk=shadow_id).update(status=ShadowRun.Status.SKIPPED, error_code="shadow_limit_reached",
                                                     finished_at=timezone.now())
        return None
    agent = agents_with_skills().filter(pk=row.experiment.agent_id).first()
    variant = Variant.objects.filter(experiment_id=row.experiment_id, name=row.variant).first()
    if agent is None or variant is None:
        ShadowRun.objects.filter(pk=shadow_id).update(status=ShadowRun.Status.SKIPPED, error_code="variant_not_found",
                                                     finished_at=timezone.now())
        return None
    spec = variant_spec(agent_spec_from_model(agent), variant_entry(variant, {}))
    return row, spec, prices_load()


async def shadow_run_execute(shadow_id: int) -> str:
    """Answer a queued shadow run with its variant and store output, latency and cost."""
    loaded = await run_db(_load, shadow_id)
    if loaded is None:
        return "skipped"
    row, spec, prices = loaded
    started = timezone.now()
    t0 = time.perf_counter()
    run = AgentRun(agent=spec, messages=list(row.messages), stream=False, skills=())
    try:
        async for _ in run.events():
            pass
    except Exception:
        logger.exception("Shadow run %s failed", shadow_id)
    latency_ms = int((time.perf_counter() - t0) * 1000)
    cost = sum((call_cost(c.usage.prompt_tokens, c.usage.completion_tokens, price_from(prices, c.model, started),
                          cached_prompt_tokens=int(getattr(c.usage, "cached_prompt_tokens", 0) or 0))
                for c in run.calls), Decimal("0"))
    failed = run.error is not None or not run.finished
    masked = spec.mask_transcripts  # kept as the live transcript is: masked (the model saw it as sent)
    fields = {"status": ShadowRun.Status.FAILED if failed else ShadowRun.Status.SUCCEEDED,
              "model": run.model or spec.model, "output": mask_text(run.output) if masked else run.output,
              **({"messages": mask_data(row.messages)} if masked else {}), "prompt_tokens": run.usage.prompt_tokens,
              "completion_tokens": run.usage.completion_tokens, "cost_usd": cost, "latency_ms": latency_ms,
              "error_code": run.error.code if run.error is not None else ("" if run.finished else "shadow_failed"),
              "finished_at": timezone.now()}
    await run_db(lambda: ShadowRun.objects.filter(pk=shadow_id, status=ShadowRun.Status.QUEUED).update(**fields))
    return str(fields["status"])
