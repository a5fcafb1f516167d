from __future__ import annotations

from django.apps import AppConfig


class AgentPlatformConfig(AppConfig):
    name = "agentplatform"
    verbose_name = "Agent Platform"

    def ready(self) -> None:
        from . import signals

        signals.install_request_boundary()
