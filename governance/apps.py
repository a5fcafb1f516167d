from django.apps import AppConfig


class GovernanceConfig(AppConfig):
    name = "governance"
    verbose_name = "Governance"

    def ready(self) -> None:
        from . import audit, flag_signals, signals  # noqa: F401  (cache invalidation, append-only guards, config audit)
