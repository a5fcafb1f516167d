"""Audit entries for configuration changes: agents, their skills, skills and feature flags.

Every save and delete of these models through the ORM (admin, REST API, load_agents, shell)
appends "config.<model>.created|updated|deleted" with the changed fields, in the transaction
of the change when there is one (the admin's views and services run in one; a bare
`instance.save()` in autocommit mode commits the change, then its entry). The actor is whoever
`governance.audit.audit_actor` names (AuditedAdminMixin names the staff user), else "system".

Senders are lazy ("app_label.Model") so importing this module needs no loaded app registry.
`QuerySet.update()` and `bulk_create()` send no signals and are not audited here: code that
changes configuration in bulk must call audit_record itself.
"""

from __future__ import annotations

import re
from typing import Any

from django.db import models
from django.db.models.signals import post_delete, post_save, pre_save

# Model label -> how targets name its rows.
AUDITED = {
    "agents.Agent": "agent",
    "agents.Skill": "skill",
    "agents.AgentSkill": "agent",  # an agent's skill list: the target is the agent
    "governance.FeatureFlag": "flag",
}
_SKIPPED_FIELDS = {"id", "created_at", "updated_at"}
# Values under keys like these (HTTP skill headers, metadata) never reach the log, masked or not.
_SECRET_KEY = re.compile(r"secret|token|passw|authorization|api[-_]?key|cookie|credential", re.IGNORECASE)
_MAX_STRING = 200


def _fields(model: type[models.Model]) -> list[models.Field]:
    return [f for f in model._meta.concrete_fields if f.name not in _SKIPPED_FIELDS]


def _shown(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= _MAX_STRING else value[:_MAX_STRING] + f"…[{len(value)} characters]"
    if isinstance(value, dict):
        return {k: "[redacted]" if _SECRET_KEY.search(str(k)) else _shown(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shown(v) for v in value]
    return value


def _snapshot(instance: models.Model) -> dict[str, Any]:
    return {f.name: _shown(f.value_from_object(instance)) for f in _fields(type(instance))}


def _related_name(instance: models.Model, name: str) -> str:
    field = instance._meta.get_field(name)
    if field.is_cached(instance):
        related = getattr(instance, name)
        return getattr(related, "name", str(related.pk))
    pk = getattr(instance, field.attname)
    found = field.related_model._default_manager.filter(pk=pk).values_list("name", flat=True).first()
    return found if found is not None else str(pk)


def _target_and_fields(instance: models.Model, fields: dict[str, Any]) -> str:
    label = AUDITED[instance._meta.label]
    if instance._meta.label == "agents.AgentSkill":
        agent = _related_name(instance, "agent")
        fields["agent"], fields["skill"] = agent, _related_name(instance, "skill")
        return f"{label}:{agent}"
    return f"{label}:{instance.name}"


def _record(instance: models.Model, change: str, details: dict[str, Any]) -> None:
    from .audit import audit_record, current_actor

    target = _target_and_fields(instance, details.get("fields", {}))
    audit_record(actor=current_actor(), action=f"config.{instance._meta.model_name}.{change}", target=target,
                 details=details)


def _remember_before(sender: type[models.Model], instance: models.Model, update_fields=None, **kwargs: Any) -> None:
    instance._audit_before = None
    if instance.pk is None or (instance._state.adding and not kwargs.get("raw")):
        return
    fields = [f for f in _fields(sender)
              if update_fields is None or f.name in update_fields or f.attname in update_fields]
    row = sender._default_manager.filter(pk=instance.pk).values(*[f.attname for f in fields]).first()
    if row is not None:
        instance._audit_before = {f.name: _shown(row[f.attname]) for f in fields}


def _saved(sender: type[models.Model], instance: models.Model, created: bool, **kwargs: Any) -> None:
    before = getattr(instance, "_audit_before", None)
    instance._audit_before = None
    if created or before is None:
        _record(instance, "created", {"fields": _snapshot(instance)})
        return
    after = _snapshot(instance)
    changed = {name: {"from": old, "to": after[name]} for name, old in before.items() if after.get(name) != old}
    if changed:  # a save that changes nothing is not a configuration change
        _record(instance, "updated", {"changed": changed})


def _deleted(sender: type[models.Model], instance: models.Model, origin: Any = None, **kwargs: Any) -> None:
    if sender._meta.label == "agents.AgentSkill" and origin is not None:
        origin_model = origin.model if isinstance(origin, models.QuerySet) else type(origin)
        if origin_model._meta.label != "agents.AgentSkill":
            return  # removed with its agent or skill, whose own entry says so
    _record(instance, "deleted", {"fields": _snapshot(instance)})


for _label in AUDITED:
    _uid = f"governance.audit_signals.{_label}"
    pre_save.connect(_remember_before, sender=_label, dispatch_uid=f"{_uid}.pre_save")
    post_save.connect(_saved, sender=_label, dispatch_uid=f"{_uid}.post_save")
    post_delete.connect(_deleted, sender=_label, dispatch_uid=f"{_uid}.post_delete")
