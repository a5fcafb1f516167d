"""ASGI entry point: HTTP through Django (plus static files when SERVE_STATIC), WebSockets
through Channels. Django is set up first (what get_asgi_application() does) so the app
registry is ready before any consumer module imports models; PlatformASGIHandler is Django's
handler minus a thread hop per request (see asgi_handler.py)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentplatform.settings")

import django  # noqa: E402

django.setup(set_prefix=False)

from .asgi_handler import PlatformASGIHandler  # noqa: E402

django_asgi_app = PlatformASGIHandler()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from .middleware import BodySizeLimitASGI  # noqa: E402

http_app = django_asgi_app
if settings.SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(http_app)

# WebSocket routes (agents.routing) arrive with the WebSocket streaming issue.
websocket_urlpatterns: list = []

application = ProtocolTypeRouter({
    "http": BodySizeLimitASGI(http_app, settings.MAX_REQUEST_BYTES),
    "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
})
