from django.apps import AppConfig


class AgentPlatformConfig(AppConfig):
    name = "agentplatform"
    verbose_name = "Agent Platform"

    def ready(self) -> None:
        from . import checks

        checks.register()  # Django's middleware deploy checks, run on our middleware subclasses
