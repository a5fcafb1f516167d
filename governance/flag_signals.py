"""Drop the cached set of feature flags whenever a flag is saved or deleted, on every worker
(the cache is shared: Redis in production).

Connected by importing governance.flags (the pipeline stage, the flags view and the flag
admin all do, and the admin is autodiscovered at startup).
"""

from __future__ import annotations

from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from .models import FeatureFlag

# The one cache entry holding every flag (read by governance.flags).
FLAGS_CACHE_KEY = "flags:all"


def _forget() -> None:
    cache.delete(FLAGS_CACHE_KEY)


@receiver(post_save, sender=FeatureFlag, dispatch_uid="governance.flags.forget_on_save")
@receiver(post_delete, sender=FeatureFlag, dispatch_uid="governance.flags.forget_on_delete")
def _forget_flags(sender, instance: FeatureFlag, **kwargs) -> None:
    _forget()
    # Again once the change commits: a request on another worker may have re-read the old rows
    # between the delete above and the commit (the admin saves inside a transaction).
    transaction.on_commit(_forget)
