from django.apps import AppConfig


class ExperimentsConfig(AppConfig):
    name = "experiments"
    verbose_name = "Experiments"

    def ready(self) -> None:
        from . import signals  # noqa: F401  (the running experiment's cache entry dropped on save)
