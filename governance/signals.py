"""Drop cached key entries whenever a key or its links to agents change, however they change,
on every worker (the cache is shared: Redis in production).

- the key itself: post_save / post_delete of ApiKey (the services save every change);
- its links through the managers (key.agents.set/add/remove/clear, agent.api_keys...): m2m_changed;
- its links removed with their agent: deleting an agent, also in bulk (the Django admin's
  "delete selected", `Agent.objects.filter(...).delete()`), cascades to the links without
  m2m_changed, and Django sends no delete signals for an auto-created link model. The agent
  itself gets pre_delete, one per agent even for a queryset delete: agents.signals forgets the
  keys linked to it then (and on commit), as it does when an agent is renamed.

Skill names in allowed_skills are plain names, not links: deleting a skill changes no key entry.
Raw SQL, QuerySet.update() and deleting link rows by hand send no signals; key entries then
live until AGENT_CACHE_SECONDS.
"""

from __future__ import annotations

from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import m2m_changed, post_delete, post_save
from django.dispatch import receiver

from .models import ApiKey
from .selectors import api_key_cache_key


def _forget(keys: list[str]) -> None:
    """Drop cache entries now and again on commit (a request between the save and the commit
    may have cached the old row again)."""
    if keys:
        cache.delete_many(keys)
        transaction.on_commit(lambda: cache.delete_many(keys))


@receiver(post_save, sender=ApiKey)
@receiver(post_delete, sender=ApiKey)
def _forget_api_key(sender, instance: ApiKey, **kwargs) -> None:
    _forget([api_key_cache_key(instance.prefix)])


@receiver(m2m_changed, sender=ApiKey.agents.through)
def _forget_api_key_agents(sender, instance, action: str, reverse: bool, pk_set, **kwargs) -> None:
    if not reverse:  # api_key.agents.add/remove/clear: instance is the key
        if action.startswith("post_"):
            _forget([api_key_cache_key(instance.prefix)])
        return
    # agent.api_keys...: instance is the agent. A clear has no pk_set: read the keys before it.
    if action == "pre_clear":
        prefixes = list(instance.api_keys.values_list("prefix", flat=True))
    elif action in ("post_add", "post_remove") and pk_set:
        prefixes = list(ApiKey.objects.filter(pk__in=pk_set).values_list("prefix", flat=True))
    else:
        return
    _forget([api_key_cache_key(p) for p in prefixes])
