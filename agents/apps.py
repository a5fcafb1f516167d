from django.apps import AppConfig


class AgentsConfig(AppConfig):
    name = "agents"
    verbose_name = "Agents"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (cache invalidation on save)
        from . import ws_signals  # noqa: F401  (WebSockets closed when their credentials end)
