from django.apps import AppConfig


class AgentPlatformConfig(AppConfig):
    name = "agentplatform"
    verbose_name = "Agent Platform"

    def ready(self) -> None:
        from . import checks

        checks.register()  # Django's middleware deploy checks, run on our middleware subclasses

        from .tracing import tracing_setup

        tracing_setup()  # OpenTelemetry, when OTEL_EXPORTER_OTLP_ENDPOINT is set
