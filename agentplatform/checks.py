"""Django's deploy checks of the security, CSRF, session and clickjacking middleware, run on ours.

agentplatform.middleware subclasses those Django classes (to run their hooks without a thread
hop). Django's own checks look for them by dotted path in MIDDLEWARE ("...SecurityMiddleware"
in settings.MIDDLEWARE), so with the subclasses `check --deploy` reported the middleware as
missing (W001, W002, W003) and skipped every check that depends on it: HSTS (W004, W005, W021),
nosniff (W006), the SSL redirect (W008), the session and CSRF cookies (W010-W016), X-Frame-Options
(W019), the referrer and opener policies (W022, E023, E024).

Here the same Django functions run, nothing re-implemented, against MIDDLEWARE as Django
would list it: each entry also named by the Django classes it extends. They replace Django's
registrations of them, so each message appears once, with Django's id (SILENCED_SYSTEM_CHECKS
works as documented).
"""

from __future__ import annotations

from typing import Any, Iterable

from django.conf import settings
from django.core import checks
from django.core.checks.security import base, csrf, sessions
from django.utils.module_loading import import_string

# Every Django check that reads settings.MIDDLEWARE by dotted path (Django 5.2).
MIDDLEWARE_CHECKS = (
    base.check_security_middleware,
    base.check_xframe_options_middleware,
    base.check_sts,
    base.check_sts_include_subdomains,
    base.check_sts_preload,
    base.check_content_type_nosniff,
    base.check_ssl_redirect,
    base.check_xframe_deny,
    base.check_referrer_policy,
    base.check_cross_origin_opener_policy,
    csrf.check_csrf_middleware,
    csrf.check_csrf_cookie_secure,
    sessions.check_session_cookie_secure,
    sessions.check_session_cookie_httponly,
)


def middleware_as_django_lists_it(middleware: Iterable[str]) -> list[str]:
    """Each dotted path, followed by those of the Django middleware classes it extends."""
    names: list[str] = []
    for path in middleware:
        names.append(path)
        try:
            factory = import_string(path)
        except ImportError:
            continue  # Django's own loading reports it
        for cls in getattr(factory, "__mro__", ())[1:]:
            if cls.__module__.startswith("django.") and cls.__name__.endswith("Middleware"):
                names.append(f"{cls.__module__}.{cls.__qualname__}")
    return list(dict.fromkeys(names))


def check_middleware_security(app_configs: Any, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.test.utils import override_settings  # the documented way to see other settings; only here

    with override_settings(MIDDLEWARE=middleware_as_django_lists_it(settings.MIDDLEWARE)):
        return [message for check in MIDDLEWARE_CHECKS for message in check(app_configs, **kwargs)]


def register() -> None:
    """Swap Django's registrations of MIDDLEWARE_CHECKS for check_middleware_security (from
    AppConfig.ready; idempotent). CheckRegistry has no unregister: its set of deploy checks is
    edited directly, and tests/test_settings.py's check --deploy tests fail if that changes."""
    registry = checks.registry.registry
    for check in MIDDLEWARE_CHECKS:
        registry.deployment_checks.discard(check)
    checks.register(check_middleware_security, checks.Tags.security, deploy=True)
