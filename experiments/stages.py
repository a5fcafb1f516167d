"""The experiment stage: applies the agent's running experiment to a turn, on every transport.

    cache_keys      the agent's running-experiment entry (experiments.selectors), read by the
                    pipeline in its one cache round trip with the key and the agent;
    before(turn)    takes that entry (no query in steady state: a miss loads and caches it); a caller the experiment's feature flag leaves
                    out is served the agent as it is. Otherwise the caller's sticky variant
                    (experiments.assignment) replaces `turn.agent` with the variant's
                    configuration — the one place a turn's model, fallbacks, system prompt,
                    temperature, max_tokens and skills come from, so the budget estimate, the
                    runtime, the run row and the `start` event all see the variant — and sets
                    `turn.variant`, `turn.experiment_id` and the `X-Agent-Variant` header (REST,
                    SSE, /v1). The run row, its usage records and its audit entry store the
                    variant; REST answers, SSE `start`/`done` and the WebSocket `start` frame
                    carry it. A share of runs (`shadow_percent`) is marked for shadow traffic.
    persist(turn)   inside the run's transaction: a marked run that succeeded gets its ShadowRun
                    row (the conversation it was sent; masked once answered when the agent masks
                    transcripts), enqueued once that commits
                    (experiments.shadow): the caller's answer, latency and budget never wait
                    for it.

Listed right after the metrics stage, before the flag and budget stages (the feature-flag stage
narrows the variant's skills; the budget stage estimates with the variant's models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.db import transaction

from agentplatform.cache import cache_get_many
from agentplatform.db import run_db
from agents.models import Run
from governance.flags import all_flags_async, flag_enabled

from .assignment import assign, in_shadow
from .models import ShadowRun
from .selectors import entry_for, entry_running, experiment_cache_key, running_experiment_entry_from_db
from .shadow import shadow_run_enqueue
from .variants import variant_spec

if TYPE_CHECKING:
    from agents.pipeline import ChatTurn

NOTE = "experiments"
VARIANT_HEADER = "X-Agent-Variant"


def assignment_unit(turn: "ChatTurn") -> str:
    if turn.use_session and turn.session_id is not None:
        return f"session:{turn.session_id}"
    if turn.principal is not None:
        return f"key:{turn.principal.prefix}"
    if turn.user_id is not None:
        return f"user:{turn.user_id}"
    return f"run:{turn.run_id}"


class ExperimentStage:
    def cache_keys(self, agent_name: str) -> list[str]:
        return [experiment_cache_key(agent_name)]

    async def before(self, turn: "ChatTurn") -> None:
        agent = turn.agent
        key = experiment_cache_key(agent.name)
        # Read with the key and the agent (the pipeline's one round trip); a spec resolved some
        # other way reads it here.
        entry = agent.cached[key] if key in agent.cached else (await cache_get_many([key])).get(key)
        entry = entry_for(entry, agent.id)
        if entry is None:
            entry = await run_db(running_experiment_entry_from_db, agent.id, agent.name)
        if not entry_running(entry):
            return
        if entry["flag"]:
            flag = (await all_flags_async()).get(entry["flag"])
            principal = turn.principal
            if flag is None or not flag_enabled(flag, key_prefix=principal.prefix if principal else None,
                                                role=principal.role if principal else None,
                                                agent_name=turn.agent.name):
                return
        name = assign(entry["id"], assignment_unit(turn), [(v["name"], v["weight"]) for v in entry["variants"]])
        variant = next((v for v in entry["variants"] if v["name"] == name), None)
        if variant is None:
            return
        base = turn.agent
        turn.agent = variant_spec(base, variant)
        if "skills" in variant:
            principal = turn.principal
            turn.skills = tuple(s for s in turn.agent.skills if principal is None or principal.may_use_skill(s.name))
        turn.variant, turn.experiment_id = variant["name"], entry["id"]
        turn.response_headers[VARIANT_HEADER] = variant["name"]
        shadow = entry.get("shadow")
        if shadow and shadow["variant"]["name"] != variant["name"] \
                and in_shadow(entry["id"], str(turn.run_id), shadow["percent"]):
            turn.notes[NOTE] = {"shadow": shadow["variant"], "base": base}

    def persist(self, turn: "ChatTurn") -> None:
        note = turn.notes.get(NOTE)
        if not note or turn.status != Run.Status.SUCCEEDED or turn.store_error:
            return
        shadow_agent = variant_spec(note["base"], note["shadow"])
        messages = [m for m in turn.run.messages if m.get("role") != "system"]
        if shadow_agent.system_prompt:
            messages.insert(0, {"role": "system", "content": shadow_agent.system_prompt})
        row = ShadowRun.objects.create(experiment_id=turn.experiment_id, variant=note["shadow"]["name"],
                                       live_run_id=turn.run_id, messages=messages, model=shadow_agent.model)
        transaction.on_commit(lambda: shadow_run_enqueue(row.id))
