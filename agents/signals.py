"""Drop cached agent specs on every change that alters what an agent is, on every worker
(the cache is shared: Redis in production). Admin saves are rare, so the few queries here
cost nothing that matters; the request path never queries for agents in steady state."""

from __future__ import annotations

from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_delete, pre_save
from django.dispatch import receiver

from .models import Agent, AgentSkill, Skill
from .selectors import agent_cache_key


def _forget(keys: list[str]) -> None:
    """Drop cache entries now and again when the transaction commits: a request that read the
    old row between the save and the commit may have cached it again meanwhile."""
    if keys:
        cache.delete_many(keys)
        transaction.on_commit(lambda: cache.delete_many(keys))


def _forget_agents(names) -> None:
    _forget([agent_cache_key(n) for n in names if n])


def _forget_keys_of(agent: Agent) -> None:
    # API-key entries cache the names of the agents a key may call.
    from governance.selectors import api_key_cache_key

    prefixes = list(agent.api_keys.values_list("prefix", flat=True)) if agent.pk else []
    _forget([api_key_cache_key(p) for p in prefixes])


@receiver(pre_save, sender=Agent)
def _remember_old_name(sender, instance: Agent, **kwargs) -> None:
    if instance.pk:
        instance._previous_name = Agent.objects.filter(pk=instance.pk).values_list("name", flat=True).first()


@receiver(post_save, sender=Agent)
def _forget_saved_agent(sender, instance: Agent, **kwargs) -> None:
    previous = getattr(instance, "_previous_name", None)
    _forget_agents([instance.name, previous])
    if previous and previous != instance.name:
        _forget_keys_of(instance)


@receiver(pre_delete, sender=Agent)
def _forget_keys_of_deleted_agent(sender, instance: Agent, **kwargs) -> None:
    # The cascade removes the agent's links to keys without m2m_changed (and Django sends no
    # delete signals for the auto-created link model), so read the keys while the links exist.
    # Sent for every agent of a queryset delete too (the admin's "delete selected").
    _forget_keys_of(instance)


@receiver(post_delete, sender=Agent)
def _forget_deleted_agent(sender, instance: Agent, **kwargs) -> None:
    _forget_agents([instance.name])


@receiver(post_save, sender=AgentSkill)
@receiver(post_delete, sender=AgentSkill)
def _forget_agent_of_link(sender, instance: AgentSkill, **kwargs) -> None:
    _forget_agents(Agent.objects.filter(pk=instance.agent_id).values_list("name", flat=True))


@receiver(m2m_changed, sender=Agent.skills.through)
def _forget_agent_skills(sender, instance, action: str, reverse: bool, **kwargs) -> None:
    if not action.startswith("post_"):
        return
    if reverse:  # skill.agents.add(...)
        _forget_agents(Agent.objects.filter(skills=instance).values_list("name", flat=True))
        _forget_agents(Agent.objects.filter(pk__in=kwargs.get("pk_set") or []).values_list("name", flat=True))
    else:
        _forget_agents([instance.name])


@receiver(post_save, sender=Skill)
@receiver(post_delete, sender=Skill)
def _forget_agents_of_skill(sender, instance: Skill, **kwargs) -> None:
    if instance.pk is not None:
        _forget_agents(Agent.objects.filter(agent_skills__skill_id=instance.pk).values_list("name", flat=True))
