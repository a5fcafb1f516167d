"""Writes of experiments: create, change (status transitions, variants), promote a winner.

Every change and its audit entry commit together (governance.audit.audit_record in the same
transaction). Rules, each a 400 naming the field:
  * 2 to 10 variants with distinct names, exactly one control (which overrides nothing), weights
    (0–100) summing to 100; skills named by a variant must exist;
  * at most one running experiment per agent (`experiment_already_running`): checked here and
    enforced by a partial unique constraint, so two concurrent starts cannot both win;
  * status moves draft → running ⇄ paused → finished (draft and paused may finish too); a
    finished experiment is read-only; variants can be replaced while draft or paused only;
  * a canary has exactly two variants, the control and the candidate, and ascending steps in
    1..100; starting it sets the candidate's weight to the first step (experiments.canary ramps it).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from agentplatform.errors import InvalidRequest, NotFound
from agents.models import MODEL_RE, Agent, AgentSkill, Skill
from governance.audit import audit_actor, audit_record

from .models import DEFAULT_CANARY_STEPS, Experiment, Variant

MAX_VARIANTS = 10
EXPERIMENT_FIELDS = ("name", "description", "flag", "min_sample", "mode", "canary_steps", "canary_interval_minutes",
                     "canary_max_error_rate_delta", "canary_max_p95_ratio", "canary_min_sample", "shadow_percent")
TRANSITIONS = {
    Experiment.Status.DRAFT: {Experiment.Status.RUNNING, Experiment.Status.FINISHED},
    Experiment.Status.RUNNING: {Experiment.Status.PAUSED, Experiment.Status.FINISHED},
    Experiment.Status.PAUSED: {Experiment.Status.RUNNING, Experiment.Status.FINISHED},
    Experiment.Status.FINISHED: set(),
}


class ExperimentAlreadyRunning(InvalidRequest):
    code = "experiment_already_running"


def _invalid(message: str, param: str, code: str = "invalid_field") -> InvalidRequest:
    return InvalidRequest(message, code=code, param=param)


def validate_variants(variants: list[dict], *, mode: str = Experiment.Mode.AB) -> None:
    """The rules on a variant list (dicts with Variant's field names); raises a 400."""
    if not 2 <= len(variants) <= MAX_VARIANTS:
        raise _invalid(f"variants: give 2 to {MAX_VARIANTS} variants (a control and at least one other).",
                       "variants")
    names = [v["name"] for v in variants]
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise _invalid(f"variants[{index}].name: {name!r} is used twice.", f"variants[{index}].name")
    controls = [i for i, v in enumerate(variants) if v.get("is_control")]
    if len(controls) != 1:
        raise _invalid("variants: exactly one variant must be the control (is_control: true).", "variants",
                       code="control_required")
    control = variants[controls[0]]
    changed = [f for f in Variant.OVERRIDES if control.get(f) not in (None, "")]
    if changed:
        raise _invalid(f"variants[{controls[0]}].{changed[0]}: the control is the agent as it is and overrides "
                       "nothing.", f"variants[{controls[0]}].{changed[0]}")
    for index, v in enumerate(variants):
        fallbacks = v.get("fallback_models")
        if fallbacks is not None and (not isinstance(fallbacks, list)
                                      or not all(isinstance(m, str) and re.match(MODEL_RE, m) for m in fallbacks)):
            raise _invalid(f'variants[{index}].fallback_models: a list of "provider/model-name" strings.',
                           f"variants[{index}].fallback_models")
        skills = v.get("skills")
        if skills is not None and (not isinstance(skills, list) or not all(isinstance(n, str) for n in skills)):
            raise _invalid(f"variants[{index}].skills: a list of skill names.", f"variants[{index}].skills")
    total = sum(int(v.get("weight", 0)) for v in variants)
    if mode != Experiment.Mode.CANARY and total != 100:
        raise _invalid(f"variants: the weights must sum to 100 (they sum to {total}).", "variants",
                       code="weights_not_100")
    wanted = {s for v in variants for s in (v.get("skills") or ())}
    if wanted:
        known = set(Skill.objects.filter(name__in=wanted).values_list("name", flat=True))
        for index, v in enumerate(variants):
            for skill in v.get("skills") or ():
                if skill not in known:
                    raise _invalid(f"variants[{index}].skills: no skill named {skill!r}.", f"variants[{index}].skills")
    if mode == Experiment.Mode.CANARY and len(variants) != 2:
        raise _invalid("variants: a canary has exactly two variants, the control and the candidate.", "variants")


def _validate_canary(steps: list[int]) -> None:
    if not steps or any(not isinstance(s, int) or not 1 <= s <= 100 for s in steps) \
            or any(b <= a for a, b in zip(steps, steps[1:])):
        raise _invalid("canary_steps: ascending percentages in 1..100, e.g. [5, 25, 50, 100].", "canary_steps")


def _check_one_running(experiment: Experiment) -> None:
    other = Experiment.objects.filter(agent_id=experiment.agent_id, status=Experiment.Status.RUNNING) \
        .exclude(pk=experiment.pk).values_list("name", flat=True).first()
    if other is not None:
        raise ExperimentAlreadyRunning(
            f"status: experiment {other!r} is already running on agent {experiment.agent.name!r}; pause or "
            "finish it first (one running experiment per agent).", param="status")


def _save_variants(experiment: Experiment, variants: list[dict]) -> None:
    experiment.variants.all().delete()
    Variant.objects.bulk_create([
        Variant(experiment=experiment, name=v["name"], weight=int(v.get("weight", 0)),
                is_control=bool(v.get("is_control")), model=v.get("model") or "",
                fallback_models=v.get("fallback_models"), system_prompt=v.get("system_prompt"),
                temperature=v.get("temperature"), max_tokens=v.get("max_tokens"), skills=v.get("skills"))
        for v in variants])


def _apply_shadow(experiment: Experiment, shadow_variant: str | None) -> None:
    if shadow_variant is None:
        return
    if shadow_variant == "":
        experiment.shadow_variant = None
        return
    variant = experiment.variants.filter(name=shadow_variant).first()
    if variant is None or variant.is_control:
        raise _invalid(f"shadow_variant: no non-control variant named {shadow_variant!r}.", "shadow_variant")
    experiment.shadow_variant = variant


def _start(experiment: Experiment, now) -> None:
    _check_one_running(experiment)
    if experiment.started_at is None:
        experiment.started_at = now
    if experiment.mode == Experiment.Mode.CANARY and not experiment.canary_state:
        steps = experiment.canary_steps or DEFAULT_CANARY_STEPS
        experiment.canary_steps, experiment.canary_step = steps, 0
        experiment.canary_state = Experiment.CanaryState.RAMPING
        experiment.canary_next_at = now + timedelta(minutes=experiment.canary_interval_minutes)
        experiment.canary_step_started_at = now
        canary_set_share(experiment, steps[0])


def canary_set_share(experiment: Experiment, percent: int) -> None:
    """The candidate gets `percent` of the traffic, the control the rest."""
    for variant in experiment.variants.all():
        variant.weight = 100 - percent if variant.is_control else percent
        variant.save(update_fields=["weight"])


def _saved(experiment: Experiment) -> None:
    try:
        with transaction.atomic():
            experiment.save()
    except IntegrityError:
        if experiment.status == Experiment.Status.RUNNING:  # lost the race to another start
            _check_one_running(experiment)
        raise


def _snapshot(experiment: Experiment) -> dict:
    return {"status": experiment.status, "mode": experiment.mode,
            "variants": [{"name": v.name, "weight": v.weight, "is_control": v.is_control, **v.overrides()}
                         for v in experiment.variants.all()]}


def experiment_audit_saved(*, experiment: Experiment, created: bool, actor: str, request_id: str = "") -> None:
    """Audit a save made by the admin's form (with its variants inline), in its transaction."""
    _audit(experiment, "experiment.created" if created else "experiment.updated", actor, request_id, None,
           after=_snapshot(experiment))


def experiment_audit_deleted(*, experiment: Experiment, actor: str) -> None:
    """Audit an experiment's deletion (its runs keep their variant and experiment id)."""
    _audit(experiment, "experiment.deleted", actor, "", None, before=_snapshot(experiment))


def _audit(experiment: Experiment, action: str, actor: str, request_id: str, client_ip: str | None,
           **details: Any) -> None:
    audit_record(actor=actor, action=action, target=f"experiment:{experiment.name}",
                 details={"experiment_id": experiment.id, "agent": experiment.agent.name, **details},
                 request_id=request_id, client_ip=client_ip)


@transaction.atomic
def experiment_create(*, agent_name: str, variants: list[dict], status: str = Experiment.Status.DRAFT,
                      shadow_variant: str | None = None, actor: str, request_id: str = "",
                      client_ip: str | None = None, **fields: Any) -> Experiment:
    agent = Agent.objects.filter(name=agent_name).first()
    if agent is None:
        raise NotFound(f"No agent named {agent_name!r}.", code="agent_not_found", param="agent")
    if Experiment.objects.filter(name=fields.get("name")).exists():
        raise _invalid(f"name: an experiment named {fields.get('name')!r} exists already.", "name",
                       code="experiment_exists")
    mode = fields.get("mode", Experiment.Mode.AB)
    validate_variants(variants, mode=mode)
    if mode == Experiment.Mode.CANARY:
        _validate_canary(fields.setdefault("canary_steps", list(DEFAULT_CANARY_STEPS)))
    if status not in (Experiment.Status.DRAFT, Experiment.Status.RUNNING):
        raise _invalid("status: a new experiment is draft or running.", "status")
    experiment = Experiment(agent=agent, status=Experiment.Status.DRAFT,
                            **{k: v for k, v in fields.items() if k in EXPERIMENT_FIELDS})
    experiment.save()
    _save_variants(experiment, variants)
    _apply_shadow(experiment, shadow_variant)
    if status == Experiment.Status.RUNNING:
        experiment.status = Experiment.Status.RUNNING
        _start(experiment, timezone.now())
    _saved(experiment)
    _audit(experiment, "experiment.created", actor, request_id, client_ip, **_snapshot(experiment))
    return experiment


@transaction.atomic
def experiment_update(*, experiment_id: int, fields: dict, actor: str, request_id: str = "",
                      client_ip: str | None = None) -> Experiment:
    """Change an experiment: its settings, its variants (draft or paused), its status."""
    experiment = Experiment.objects.select_for_update().select_related("agent").filter(pk=experiment_id).first()
    if experiment is None:
        raise NotFound(f"No experiment with id {experiment_id}.", code="experiment_not_found", param="id")
    if experiment.status == Experiment.Status.FINISHED:
        raise InvalidRequest("This experiment is finished; create another one.", code="experiment_finished")
    fields = dict(fields)
    status = fields.pop("status", None)
    variants = fields.pop("variants", None)
    shadow_variant = fields.pop("shadow_variant", None)
    before = _snapshot(experiment)
    if "name" in fields and Experiment.objects.filter(name=fields["name"]).exclude(pk=experiment.pk).exists():
        raise _invalid(f"name: an experiment named {fields['name']!r} exists already.", "name",
                       code="experiment_exists")
    if "mode" in fields and fields["mode"] != experiment.mode and experiment.status != Experiment.Status.DRAFT:
        raise _invalid("mode: only a draft experiment can change its mode.", "mode")
    for name, value in fields.items():
        if name in EXPERIMENT_FIELDS:
            setattr(experiment, name, value)
    if "canary_steps" in fields and experiment.mode == Experiment.Mode.CANARY:
        _validate_canary(experiment.canary_steps)
    if variants is not None:
        if experiment.status == Experiment.Status.RUNNING:
            raise _invalid("variants: pause the experiment before changing its variants.", "variants")
        validate_variants(variants, mode=experiment.mode)
        if shadow_variant is None and experiment.shadow_variant_id is not None:
            # The rows are replaced: keep the shadow by name (none if that name is gone).
            kept = experiment.variants.filter(pk=experiment.shadow_variant_id).values_list("name", flat=True).first()
            shadow_variant = kept if kept in {v["name"] for v in variants} else ""
        _save_variants(experiment, variants)
    elif "mode" in fields:
        validate_variants([{"name": v.name, "weight": v.weight, "is_control": v.is_control, **v.overrides()}
                           for v in experiment.variants.all()], mode=experiment.mode)
    _apply_shadow(experiment, shadow_variant)
    now = timezone.now()
    if status is not None and status != experiment.status:
        if status not in TRANSITIONS[experiment.status]:
            raise _invalid(f"status: a {experiment.status} experiment cannot become {status}.", "status",
                           code="invalid_transition")
        experiment.status = status
        if status == Experiment.Status.RUNNING:
            _start(experiment, now)
        elif status == Experiment.Status.FINISHED:
            experiment.ended_at = now
    _saved(experiment)
    _audit(experiment, "experiment.updated", actor, request_id, client_ip, before=before, after=_snapshot(experiment))
    return experiment


@transaction.atomic
def experiment_promote(*, experiment_id: int, variant_name: str, actor: str, request_id: str = "",
                       client_ip: str | None = None) -> Experiment:
    """Apply a variant's overrides to the agent's configuration and finish the experiment."""
    experiment = Experiment.objects.select_for_update().select_related("agent").filter(pk=experiment_id).first()
    if experiment is None:
        raise NotFound(f"No experiment with id {experiment_id}.", code="experiment_not_found", param="id")
    if experiment.status == Experiment.Status.FINISHED:
        raise InvalidRequest("This experiment is finished already.", code="experiment_finished")
    variant = experiment.variants.filter(name=variant_name).first()
    if variant is None:
        raise _invalid(f"variant: no variant named {variant_name!r}.", "variant")
    overrides = variant.overrides()
    agent = experiment.agent
    with audit_actor(actor):  # the agent's own config.* entries name the same actor
        skills = overrides.pop("skills", None)
        for name, value in overrides.items():
            setattr(agent, name, value)
        if overrides:
            agent.save()
        if skills is not None:
            AgentSkill.objects.filter(agent=agent).delete()
            by_name = Skill.objects.in_bulk(skills, field_name="name")
            for position, name in enumerate(skills):
                if name in by_name:
                    AgentSkill.objects.create(agent=agent, skill=by_name[name], position=position)
            agent.save(update_fields=["updated_at"])  # drops the cached spec
    experiment.status = Experiment.Status.FINISHED
    experiment.ended_at = timezone.now()
    experiment.promoted_variant = variant.name
    _saved(experiment)
    _audit(experiment, "experiment.promoted", actor, request_id, client_ip, variant=variant.name,
           applied={**overrides, **({"skills": skills} if skills is not None else {})})
    return experiment
