"""The metering stage: every model call of every run becomes a UsageRecord with its USD cost.

    before(turn)    loads all prices in one async cache read (a miss: one query, then cached)
                    into turn.notes, so pricing the run later needs no I/O;
    finished(turn)  sync, no I/O: prices each call of turn.run.calls and sets turn.cost_usd
                    (a Decimal, the sum of the calls' rounded costs) and turn.billed_usage (the
                    tokens as billed, estimated ones included), so `done` carries them;
    persist(turn)   inside the run's transaction: one UsageRecord per call (bulk_create, in call
                    order), so the usage commits or vanishes with the run it belongs to. The
                    first call's record has starts_run=True: the one record that counts the run
                    as a request (billing.rollups). A run is persisted once (its id is the Run's
                    primary key; an idempotent replay answers from the stored response and runs
                    no pipeline), so exactly one record per run that has records starts it. An async run started
                    again (its worker died, an admin retried it: `turn.counted_before`) was counted
                    by its first attempt's records: this attempt's start nothing.

Failed, cancelled and client-disconnected runs go through finished/persist too (the pipeline
calls them from its `finally`). A failed call costs the usage its provider error carries: none
for a call the upstream refused or never answered; for one that failed after the upstream's 200
(a stream cut off by the upstream: `upstream_stream_cut`) its prompt and what it produced,
counted offline by the provider, the record marked estimated. A stream cut off by the client
loses its in-flight call's final usage chunk: the text produced so far is counted offline
(agents.providers.estimate_tokens) and the record is marked estimated.
Prices are those in force when the run started.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal

from agentplatform.cache import cache_get_many
from agentplatform.db import run_db
from agentplatform.metrics import llm_usage

from .pricing import PRICES_CACHE_KEY, Price, Usd, call_cost, price_from, prices_load

NOTE = "billing.metering"


@dataclass(frozen=True)
class MeteredCall:
    model: str
    prompt_tokens: int
    cached_prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    estimated: bool
    priced: bool


def metered_calls(turn, prices: list[dict], *, checkpoint: bool = False) -> list[MeteredCall]:
    """The priced calls of a finished turn (no I/O). `checkpoint`: of a turn still running,
    its in-flight call's text so far counted offline (agents.recovery's lease checkpoints)."""
    from agents.models import Run

    run = turn.run
    at = turn.started_at
    out: list[MeteredCall] = []
    calls = list(run.calls)
    for call in calls:
        usage = call.usage
        cached = int(getattr(usage, "cached_prompt_tokens", 0) or 0)
        out.append(_metered(call.model, usage.prompt_tokens, cached, usage.completion_tokens,
                            estimated=not usage.reported, price=price_from(prices, call.model, at)))
    in_flight = run.partial_output[len(run.output):]
    if (checkpoint or turn.status == Run.Status.CANCELLED) and not run.finished and run.error is None and in_flight:
        model = run.model_in_flight or turn.agent.model
        prompt, completion = _estimate(run, in_flight)
        out.append(_metered(model, prompt, 0, completion, estimated=True, price=price_from(prices, model, at)))
    return out


def _metered(model: str, prompt: int, cached: int, completion: int, *, estimated: bool, price: Price) -> MeteredCall:
    return MeteredCall(model=model, prompt_tokens=prompt, cached_prompt_tokens=cached, completion_tokens=completion,
                       cost_usd=call_cost(prompt, completion, price, cached_prompt_tokens=cached),
                       estimated=estimated, priced=price.priced)


def _estimate(run, text: str) -> tuple[int, int]:
    from agents.providers.base import estimate_tokens

    # The conversation the in-flight call was sent: the run's messages plus what it added.
    messages = [*run.messages, *run.produced]
    prompt = sum(estimate_tokens(json.dumps(m.get("content") or "")) + 4 for m in messages)
    return prompt, estimate_tokens(text)


class MeteringStage:
    async def before(self, turn) -> None:
        found = await cache_get_many([PRICES_CACHE_KEY])
        prices = found.get(PRICES_CACHE_KEY)
        if prices is None:
            prices = await run_db(prices_load)
        turn.notes[NOTE] = {"prices": prices}

    def finished(self, turn) -> None:
        note = turn.notes.setdefault(NOTE, {"prices": []})
        calls = metered_calls(turn, note["prices"])
        note["calls"] = calls
        llm_usage(agent=turn.agent.name, calls=calls)
        turn.cost_usd = Usd(sum((c.cost_usd for c in calls), Decimal("0")).quantize(Decimal("0.00000001")))
        prompt = sum(c.prompt_tokens for c in calls)
        completion = sum(c.completion_tokens for c in calls)
        turn.billed_usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion, "estimated": any(c.estimated for c in calls)}

    def persist(self, turn) -> None:
        from .models import UsageRecord

        note = turn.notes.get(NOTE) or {}
        calls = note.get("calls")
        if calls is None:
            return  # the run never ended (finished is called before persist in every path)
        now = turn.started_at
        principal = turn.principal
        UsageRecord.objects.bulk_create([
            UsageRecord(created_at=now, run_id=turn.run_id, api_key_id=principal.key_id if principal else None,
                        agent_id=turn.agent.id, model=c.model, session_id=turn.session_id if turn.use_session else None,
                        request_id=(turn.request_id or "")[:128], variant=turn.variant[:100],
                        prompt_tokens=c.prompt_tokens, cached_prompt_tokens=c.cached_prompt_tokens,
                        completion_tokens=c.completion_tokens, cost_usd=Decimal(c.cost_usd), estimated=c.estimated,
                        priced=c.priced, starts_run=index == 0 and turn.run_id is not None
                        and not turn.counted_before)
            for index, c in enumerate(calls)])
