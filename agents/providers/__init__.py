"""Provider registry, keyed by the prefix of an agent's model string ("provider/model-name").

`local` is built in; `openai` is configured by OPENAI_API_KEY / OPENAI_BASE_URL; further
OpenAI-compatible providers come from LLM_PROVIDERS (name → base URL + the name of the env
var holding the key). Providers are built once per process and rebuilt when those settings
change (tests override them).
"""

from __future__ import annotations

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .base import Completion, ModelCall, Provider, ProviderError, TextDelta, ToolCall, Usage
from .local import LocalProvider
from .openai_compat import OpenAICompatibleProvider

__all__ = ["Completion", "ModelCall", "Provider", "ProviderError", "TextDelta", "ToolCall", "Usage",
           "provider_for", "provider_names"]

_registry: dict[str, Provider] | None = None


def _build() -> dict[str, Provider]:
    providers: dict[str, Provider] = {
        "local": LocalProvider(),
        "openai": OpenAICompatibleProvider("openai", api_key=settings.OPENAI_API_KEY,
                                           base_url=settings.OPENAI_BASE_URL),
    }
    for name, conf in settings.LLM_PROVIDERS.items():
        providers[name] = OpenAICompatibleProvider(name, api_key=conf.get("api_key", ""), base_url=conf["base_url"])
    return providers


def provider_names() -> list[str]:
    return sorted(_providers())


def _providers() -> dict[str, Provider]:
    global _registry
    if _registry is None:
        _registry = _build()
    return _registry


def provider_for(model: str) -> tuple[Provider, str]:
    """The provider of "provider/model-name" and the model name it expects."""
    prefix, _, name = model.partition("/")
    provider = _providers().get(prefix)
    if provider is None or not name:
        raise ProviderError(f"No provider named {prefix!r} is configured (model {model!r}).",
                            code="unknown_provider", permanent=True)
    return provider, name


@receiver(setting_changed)
def _reset(*, setting: str, **kwargs) -> None:
    global _registry
    if setting in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "LLM_PROVIDERS"):
        _registry = None
