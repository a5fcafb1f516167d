"""Drop an agent's running-experiment cache entry whenever one of its experiments or their
variants changes (admin, REST, canary steps), or the agent is renamed; now and again on commit
(as agents.signals)."""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from agents.models import Agent

from .models import Experiment, Variant
from .selectors import forget_experiment_of


def _agent_name(agent_id: int) -> str | None:
    return Agent.objects.filter(pk=agent_id).values_list("name", flat=True).first()


@receiver(post_save, sender=Experiment)
@receiver(post_delete, sender=Experiment)
def _forget_experiment(sender, instance: Experiment, **kwargs) -> None:
    agent = instance.agent if Experiment.agent.is_cached(instance) else None
    forget_experiment_of(agent.name if agent is not None else _agent_name(instance.agent_id))


@receiver(post_save, sender=Variant)
@receiver(post_delete, sender=Variant)
def _forget_variant(sender, instance: Variant, **kwargs) -> None:
    agent_id = Experiment.objects.filter(pk=instance.experiment_id).values_list("agent_id", flat=True).first()
    if agent_id is not None:
        forget_experiment_of(_agent_name(agent_id))


@receiver(post_save, sender=Agent)
def _forget_renamed_agent(sender, instance: Agent, **kwargs) -> None:
    # agents.signals remembers the name before the save.
    forget_experiment_of(instance.name, getattr(instance, "_previous_name", None))
