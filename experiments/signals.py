"""Drop an agent's running-experiment cache entry whenever one of its experiments or their
variants changes (admin, REST, canary steps), now and again on commit (as agents.signals)."""

from __future__ import annotations

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .models import Experiment, Variant
from .selectors import forget_experiment_of


@receiver(post_save, sender=Experiment)
@receiver(post_delete, sender=Experiment)
def _forget_experiment(sender, instance: Experiment, **kwargs) -> None:
    forget_experiment_of(instance.agent_id)


@receiver(post_save, sender=Variant)
@receiver(post_delete, sender=Variant)
def _forget_variant(sender, instance: Variant, **kwargs) -> None:
    agent_id = Experiment.objects.filter(pk=instance.experiment_id).values_list("agent_id", flat=True).first()
    if agent_id is not None:
        forget_experiment_of(agent_id)
