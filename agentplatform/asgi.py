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

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.sessions import SessionMiddlewareStack  # noqa: E402
from django.conf import settings  # noqa: E402

from agents.routing import websocket_urlpatterns  # noqa: E402

from .metrics import metrics_port_serve  # noqa: E402
from .middleware import BodySizeLimitASGI  # noqa: E402
from .tracing import TracedASGI  # noqa: E402

http_app = django_asgi_app
if settings.SERVE_STATIC:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    http_app = ASGIStaticFilesHandler(http_app)

# WebSockets: the session cookie is parsed (lazily: no query unless a consumer reads it), but no
# Origin check happens here: server clients authenticate with a Bearer key and send no Origin,
# which channels' AllowedHostsOriginValidator would refuse. The consumer checks the Host against
# ALLOWED_HOSTS and honours a session only from this site's own Origin (agents.consumers).
# Crash safety on start-up: runs a dead process left `running` are ended (agents.recovery);
# on the embedded default, the beat schedule runs in this process (agentplatform.scheduler).
from agents.recovery import sweep_on_startup  # noqa: E402

from .scheduler import start_inprocess_beat  # noqa: E402

sweep_on_startup()
start_inprocess_beat()

application = ProtocolTypeRouter({
    # The request's span (while tracing is on) covers everything, the 413s included.
    "http": TracedASGI(BodySizeLimitASGI(http_app, settings.MAX_REQUEST_BYTES)),
    "websocket": SessionMiddlewareStack(URLRouter(websocket_urlpatterns)),
})

# METRICS_PORT: every server process of the host opens it (SO_REUSEPORT), unauthenticated.
if settings.METRICS_PORT:
    metrics_port_serve(settings.METRICS_PORT)
