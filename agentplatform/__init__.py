"""Agent Platform's Django project package (named agentplatform, not platform: a top-level
package called `platform` would shadow Python's standard-library module of that name)."""

from .celery import app as celery_app

__all__ = ("celery_app",)
